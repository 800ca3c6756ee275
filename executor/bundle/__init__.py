"""Code bundles: the `fast<digest>.tar.gz` archives that fast registration ships to pods."""
