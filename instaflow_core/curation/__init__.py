"""Prompt curation: streaming caption readers (`readers`) and pure prompt functions (`prompts`)."""
