"""Optional fast paths, each behind one public function with a pure-PyTorch reference beside it."""
