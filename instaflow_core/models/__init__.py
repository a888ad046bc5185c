"""Models: the model-family seam (`family`: Condition, Model, Velocity, ModelFamily, the registry) and one module
per family (`sd`: SD 1.x / 2.x and the tiny factory; `sdxl`, `sd3`, `flux`; the digits pixel model lives with its
experiment), where a reference's files are (`sources`), loading (`loading`), the teacher stage (`teacher`), what
a saved folder holds (`folder_layout`), latent geometry (`geometry`), GPU switches (`switches`), LoRA and weight
deltas for inference (`lora`), the tiny CLIP tokenizer (`tokenizer`)."""
