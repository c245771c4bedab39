"""Optional inference engines beside the built-in transformers ones. `merge_distill.backends.vllm` (`pip install
'merge-distill[vllm]'`, CUDA only) implements the `Sampler` and `Scorer` protocols of `merge_distill.engines`,
which picks an engine per a recipe's `backend:` section (`make_sampler`, `make_scorer`)."""
