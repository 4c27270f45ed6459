"""On-demand segmentation: the server hosts a trained UMN over HTTPS; a site queries it."""
