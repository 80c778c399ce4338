"""The method: its objective and losses, information-asymmetric partners, the identity graph, clustering."""
