//! Rows on disk to token batches: readers, schemas, chat formatting, loss masks, padding and packing.
