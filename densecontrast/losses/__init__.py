"""Dense and global self-supervised losses; every dense loss reads :class:`~densecontrast.matching.Matches`."""
