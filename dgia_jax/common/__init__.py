"""What every layer shares: the user's errors, the mesh, the program start's allocator setting, config files."""
