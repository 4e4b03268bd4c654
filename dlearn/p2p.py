"""Chapter 11: Prompt-to-Prompt attention control (Hertz et al., 2022) on a diffusers Stable Diffusion pipeline."""
