"""The cluster's own: its life cycle through the provider contract, servers/, its key, node access, images, budget."""
