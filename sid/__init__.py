"""sid: one-step distillation of diffusion models with identity-based losses (SiD, FGM, any λ)."""
