"""The decoding engine: sequence state, scheduler, model runner, sampler."""
