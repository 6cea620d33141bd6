//! Rows on disk to token batches: readers, schemas, chat formatting, loss masks, padding
//! and packing.
//!
//! ```text
//! RecordReader (JSONL / JSON / Parquet, files, dirs, globs)  -> Record {location, fields}
//!   -> Example (schema or adapter, validated)                 -> ExampleTokenizer
//!   -> Tokenized (ids + loss mask / prompt-completion split)  -> pad_right / pad_left / pack
//!   -> HostBatch -> align_model::TokenBatch;  Loader decides the order.
//! ```

pub mod adapters;
pub mod batch;
pub mod curriculum;
pub mod dataset;
pub mod error;
pub mod loader;
pub mod schema;
pub mod scored;
pub mod source;
pub mod stage_rows;
pub mod synthetic;
pub mod tokenize;

pub use adapters::{Adapter, MultipleChoice};
pub use batch::{
    ForwardLayout, HostBatch, LossPositions, pack, pack_best_fit_decreasing, pack_placed, pad_left, pad_right,
};
pub use dataset::{DatasetConfig, SkipReport, column_numbers, examples, examples_as, load_examples, load_examples_as};
pub use error::{DataError, Location, Result};
pub use loader::{Curriculum, Loader, LoaderState};
pub use schema::{ColumnMap, Content, Example, SchemaKind};
pub use source::{Record, RecordReader};
pub use stage_rows::{
    GenerationPrompt, LabelledCompletion, PreferencePair, ScoredSft, SftRow, generation_prompts,
    generation_prompts_conditioned, labelled_completions, preference_pairs, sft_rows, sft_sequences,
};
pub use tokenize::{
    ChatFormat, ExampleTokenizer, Formatter, TokenizeConfig, Tokenized, TokenizedSequence, Truncation, TruncationStats,
};
