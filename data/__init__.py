"""Chat data for MTP training and evaluation.

  data.tokenizer  the Qwen3 tokenizer rebuilt offline; load_tokenizer for any tokenizer dir
  data.sharegpt   the packaged (truncated) ShareGPT V3 JSON -> complete records / JSONL
  data.chat       raw rows -> normalized messages -> input_ids + assistant loss_mask;
                  prompts for the evaluator
  data.collate    BucketBatchSampler (length buckets, rank shards) and collate_batch

Nothing is imported here, so `import data.collate` does not pay for `datasets`/`transformers`.
"""
