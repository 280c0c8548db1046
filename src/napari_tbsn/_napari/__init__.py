"""The napari plugin: a dock widget over the Denoiser facade, a loss plot, sample data."""
