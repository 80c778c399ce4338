"""Training: the loop, the one build chain, the step, its periodic actions, the optimizer, the config's domains, the ablation study."""
