"""Chapter 11's trained tiny Stable Diffusion: the recipe that trains it on the digits and the metrics it reaches."""
