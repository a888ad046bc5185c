"""The digits experiment, in one room: real images end to end on a CPU (the `digits` preset).

scikit-learn's 1,797 handwritten 8x8 digits become an (image, caption) table (`images`: the image source,
registered in `curation.images.IMAGE_SOURCES`); the pipeline pretrains its own teacher on them (`model`: a
pixel-space velocity net behind the SD family's seam, registered in `models.family.FAMILIES` as `digits`);
evaluation measures Frechet distance in a classifier's features and prompt alignment (`classifier`,
registered in `evaluation.stage.EXPERIMENT_NETWORKS`). `config` holds the preset's `digits:` section
(registered in `config.EXPERIMENT_SECTIONS`). Nothing in core's vocabulary imports this package.
"""
