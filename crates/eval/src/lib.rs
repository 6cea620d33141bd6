//! Benchmarks and reports: multiple-choice log-likelihood, generative math, win rate, perplexity.
