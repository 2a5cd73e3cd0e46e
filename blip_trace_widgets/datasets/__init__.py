"""Questions to trace: easy-VQA's demo questions and pairs, the paper's subsets, Hugging Face datasets."""
