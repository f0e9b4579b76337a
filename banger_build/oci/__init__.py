"""Everything about OCI images and registries: one image source for the build."""
