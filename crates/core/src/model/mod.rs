//! The vLLM block-pool cache model (to be written: see issue 4).
