"""The BitTorrent peer daemon: storage, piece picking, choking and the trio shell."""
