"""Providers: where the machine is and its lifecycle (EC2 launch, stop, resize, cost)."""
