"""Models: SD components (`components`), loading from a folder, single file or hub id (`loading`), the tiny
factory (`tiny`) and its tokenizer, the velocity adapter (`velocity`), LoRA and weight deltas (`lora`)."""
