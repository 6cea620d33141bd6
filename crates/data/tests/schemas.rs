//! Every schema round-trips through every file format, column mapping works, the built-in
//! adapters read the real PIQA and GSM8K slices, and each kind of bad row is an error that
//! names file, line (or element / row group and row) and field.

use std::path::{Path, PathBuf};

use align_data::{Adapter, Content, DataError, DatasetConfig, Example, SchemaKind, load_examples};
use align_model::ChatMessage;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data")
}

fn load(path: PathBuf) -> Vec<Example> {
    load_examples(&DatasetConfig::new(path)).unwrap_or_else(|e| panic!("{e}")).0
}

fn m(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn text(s: &str) -> Content {
    Content::Text(s.into())
}

fn expected() -> Vec<Example> {
    vec![
        Example::Text { text: "The quick brown fox jumps over the lazy dog.".into() },
        Example::PromptCompletion { prompt: text("Question: 2+2?\nAnswer:"), completion: text(" 4") },
        Example::Conversation {
            messages: vec![
                m("system", "Be brief."),
                m("user", "Hi"),
                m("assistant", "Hello!"),
                m("user", "Bye"),
                m("assistant", "Goodbye."),
            ],
        },
        Example::Preference {
            prompt: text("The sky is"),
            chosen: text(" blue."),
            rejected: text(" green."),
            margin: None,
        },
        // implicit prompt, text: the shared prefix, backing off the space
        Example::Preference {
            prompt: text("The capital of France is"),
            chosen: text(" Paris."),
            rejected: text(" Rome."),
            margin: None,
        },
        Example::Preference {
            prompt: Content::Messages(vec![m("user", "Best pet?")]),
            chosen: Content::Messages(vec![m("assistant", "A cat.")]),
            rejected: Content::Messages(vec![m("assistant", "A rock.")]),
            margin: None,
        },
        // implicit prompt, conversational: the shared leading messages
        Example::Preference {
            prompt: Content::Messages(vec![m("user", "2+2?")]),
            chosen: Content::Messages(vec![m("assistant", "4")]),
            rejected: Content::Messages(vec![m("assistant", "5")]),
            margin: None,
        },
        Example::UnpairedPreference {
            prompt: text("Water boils at"),
            completion: text(" 100 C at sea level."),
            label: true,
        },
        Example::PromptAnswer { prompt: text("Natalia sold 48 clips. How many?"), answer: "72".into() },
        Example::ScoredConversation {
            messages: vec![m("user", "Tell me a joke."), m("assistant", "Why did the chicken cross the road?")],
            score: 7.5,
            reason: Some("funny enough".into()),
        },
    ]
}

#[test]
fn every_schema_round_trips_in_jsonl_json_and_parquet() {
    let want = expected();
    assert_eq!(load(fixtures().join("schemas.jsonl")), want);
    assert_eq!(load(fixtures().join("schemas.json")), want);
    // One Parquet file per schema (nested lists of structs for messages), three copies of
    // its row in row groups of two; the directory reads in file order.
    let parquet = load(fixtures().join("schemas_parquet"));
    let tripled: Vec<Example> = want.iter().flat_map(|e| std::iter::repeat_n(e.clone(), 3)).collect();
    assert_eq!(parquet, tripled);
    // a glob picks the same files
    let glob = load(fixtures().join("schemas_parquet/part-0[0-2].parquet"));
    assert_eq!(glob, tripled[..9].to_vec());
}

fn write(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("align-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn preference_rows_carry_an_optional_margin() {
    let p = write(
        "margin.jsonl",
        "{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" c\", \"margin\": 1.5}\n{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" c\"}\n",
    );
    let ex = load(p);
    assert!(matches!(ex[0], Example::Preference { margin: Some(m), .. } if m == 1.5));
    assert!(matches!(ex[1], Example::Preference { margin: None, .. }));
}

#[test]
fn column_mapping_renames_before_parsing() {
    let p = write("mapped.jsonl", "{\"question\": \"Q?\", \"response\": \" A.\", \"id\": 3}\n");
    let mut cfg = DatasetConfig::new(p);
    cfg.columns.insert("prompt".into(), "question".into());
    cfg.columns.insert("completion".into(), "response".into());
    let (ex, _) = load_examples(&cfg).unwrap();
    assert_eq!(ex, vec![Example::PromptCompletion { prompt: text("Q?"), completion: text(" A.") }]);
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let cases: &[(&str, SchemaKind, &[&str])] = &[
        ("{\"prompt\": \"a\", \"completion\": ", SchemaKind::Auto, &["bad.jsonl:1", "invalid JSON"]),
        ("[1, 2]", SchemaKind::Auto, &["bad.jsonl:1", "expected a JSON object"]),
        ("{\"prompt\": \"a\"}", SchemaKind::PromptCompletion, &["bad.jsonl:1", "field `completion`", "missing"]),
        (
            "{\"prompt\": \"a\", \"completion\": 5}",
            SchemaKind::Auto,
            &["field `completion`", "expected a string or a list of messages, found a number"],
        ),
        ("{\"prompt\": \"a\", \"completion\": \"\"}", SchemaKind::Auto, &["field `completion`", "is empty"]),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}",
            SchemaKind::Auto,
            &["field `messages[1].role`", "roles do not alternate"],
        ),
        (
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"a\"}]}",
            SchemaKind::Auto,
            &["field `messages[0].role`", "unknown role \"wizard\""],
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": 1}]}",
            SchemaKind::Auto,
            &["field `messages[0].content`", "expected a string"],
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
            SchemaKind::Auto,
            &["field `messages`", "no assistant message"],
        ),
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": \"yes\"}",
            SchemaKind::Auto,
            &["field `label`", "expected true or false"],
        ),
        (
            "{\"conversation\": [{\"role\": \"user\", \"content\": \"a\"}], \"meta_eval_score\": 1}",
            SchemaKind::Auto,
            &["field `conversation[0].role`", "unknown role \"user\""],
        ),
        (
            "{\"conversation\": [{\"role\": \"human\", \"content\": \"a\"}], \"meta_eval_score\": \"high\"}",
            SchemaKind::Auto,
            &["field `meta_eval_score`", "expected a number"],
        ),
        ("{\"chosen\": \"same\", \"rejected\": \"other\"}", SchemaKind::Auto, &["field `prompt`", "share no prefix"]),
        (
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\", \"margin\": \"big\"}",
            SchemaKind::Auto,
            &["field `margin`", "expected a number, found a string"],
        ),
        ("{\"foo\": 1}", SchemaKind::Auto, &["bad.jsonl:1", "no known schema"]),
    ];
    for (line, schema, needles) in cases {
        let p = write("bad.jsonl", &format!("{{\"text\": \"fine\"}}\n\n{line}\n").replacen("\n\n", "\n", 1));
        let mut cfg = DatasetConfig::new(p);
        cfg.schema = *schema;
        if *schema != SchemaKind::Auto {
            // the first (text) row does not fit a fixed schema: put the bad row first instead
            std::fs::write(&cfg.path, format!("{line}\n")).unwrap();
        }
        let err = load_examples(&cfg).err().unwrap_or_else(|| panic!("{line} must fail")).to_string();
        let line_no = if *schema == SchemaKind::Auto { "bad.jsonl:2" } else { "bad.jsonl:1" };
        let needles: Vec<String> = needles.iter().map(|n| n.replace("bad.jsonl:1", line_no)).collect();
        for n in &needles {
            assert!(err.contains(n.as_str()), "{line}: error {err:?} lacks {n:?}");
        }
    }
    // JSON arrays name the element, Parquet the row group and row.
    let p = write("bad.json", "[{\"text\": \"ok\"}, {\"text\": 3}]");
    let e = load_examples(&DatasetConfig::new(p)).unwrap_err().to_string();
    assert!(e.contains("bad.json: element 1") && e.contains("field `text`"), "{e}");
    let e = load_examples(&DatasetConfig {
        schema: SchemaKind::PromptAnswer,
        ..DatasetConfig::new(fixtures().join("schemas_parquet/part-03.parquet"))
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("part-03.parquet: row group 0, row 0") && e.contains("field `answer`"), "{e}");
}

#[test]
fn skip_invalid_counts_and_reports() {
    let p = write("mixed.jsonl", "{\"text\": \"a\"}\n{\"text\": 1}\n{\"text\": \"b\"}\n{\"nope\": 1}\n");
    let cfg = DatasetConfig { skip_invalid: true, ..DatasetConfig::new(p.clone()) };
    let (ex, report) = load_examples(&cfg).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(report.skipped, 2);
    assert!(report.first_reasons[0].contains("mixed.jsonl:2"), "{:?}", report.first_reasons);
    assert!(report.first_reasons[1].contains("mixed.jsonl:4"));
    // without it, the first bad row stops the read
    assert!(matches!(load_examples(&DatasetConfig::new(p)), Err(DataError::Row { .. })));
}

#[test]
fn piqa_and_gsm8k_adapters() {
    let piqa = DatasetConfig {
        adapter: Some(Adapter::PiqaPreference),
        ..DatasetConfig::new(fixtures().join("piqa_head.jsonl"))
    };
    let (ex, _) = load_examples(&piqa).unwrap();
    assert_eq!(ex.len(), 32);
    // row 1: {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ", "label": 1}
    assert_eq!(
        ex[0],
        Example::Preference {
            prompt: text("Question: dresser\nAnswer:"),
            chosen: text(" finish, woodgrain with  bobby pin "),
            rejected: text(" replace drawer with bobby pin "),
            margin: None,
        }
    );
    let sft = DatasetConfig {
        adapter: Some(Adapter::Gsm8kSft),
        ..DatasetConfig::new(fixtures().join("gsm8k_train_head.jsonl"))
    };
    let (ex, _) = load_examples(&sft).unwrap();
    let Example::PromptCompletion { prompt: Content::Text(p), completion: Content::Text(c) } = &ex[0] else {
        panic!("{:?}", ex[0])
    };
    assert!(p.ends_with("User: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\nAssistant: <think>"));
    assert_eq!(
        c,
        " Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May. </think> <answer> 72 </answer>"
    );
    let rl = DatasetConfig {
        adapter: Some(Adapter::Gsm8kR1Zero),
        ..DatasetConfig::new(fixtures().join("gsm8k_test_head.jsonl"))
    };
    let (ex, _) = load_examples(&rl).unwrap();
    assert_eq!(ex.len(), 16);
    assert!(
        ex.iter()
            .all(|e| matches!(e, Example::PromptAnswer { answer, .. } if !answer.contains(',') && !answer.is_empty()))
    );
}

/// Examples serialise (e.g. into a run's cache) and read back unchanged.
#[test]
fn examples_serde_round_trip() {
    for e in expected() {
        let json = serde_json::to_string(&e).unwrap();
        let back: Example = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e, "{json}");
    }
}

/// TRL's prompt-only rows (RL without a ground truth): text or a user turn.
#[test]
fn prompt_only_rows() {
    let dir = std::env::temp_dir().join(format!("align-prompt-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("p.jsonl");
    std::fs::write(
        &f,
        "{\"prompt\": \"Tell me a joke.\"}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
    )
    .unwrap();
    assert_eq!(
        load(f.clone()),
        vec![
            Example::PromptOnly { prompt: text("Tell me a joke.") },
            Example::PromptOnly { prompt: Content::Messages(vec![m("user", "Hi")]) },
        ]
    );
    std::fs::write(&f, "{\"prompt\": [{\"role\": \"assistant\", \"content\": \"Hi\"}]}\n").unwrap();
    let e = load_examples(&DatasetConfig::new(&f)).unwrap_err().to_string();
    assert!(e.contains("p.jsonl:1") && e.contains("prompt"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `column_numbers` reads a column of exactly the rows the examples keep: an invalid row
/// skipped under `skip_invalid` is skipped there too, and `skip`/`limit` apply alike.
#[test]
fn column_numbers_follow_the_kept_rows() {
    let dir = std::env::temp_dir().join(format!("align-columns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("rows.jsonl");
    let row = |score: &str, d: u32| {
        format!(
            "{{\"conversation\": [{{\"role\": \"human\", \"content\": \"q\"}}, {{\"role\": \"assistant\", \"content\": \"a\"}}], \"meta_eval_score\": {score}, \"difficulty\": {d}}}\n"
        )
    };
    std::fs::write(&f, [row("4", 2), row("\"high\"", 9), row("1", 5), row("3", 7)].concat()).unwrap();
    let mut cfg = align_data::DatasetConfig::new(&f);
    cfg.skip_invalid = true;
    let (examples, report) = align_data::load_examples(&cfg).unwrap();
    assert_eq!((examples.len(), report.skipped), (3, 1));
    assert_eq!(align_data::column_numbers(&cfg, &[], "difficulty").unwrap(), vec![2.0, 5.0, 7.0]);
    cfg.skip = 1;
    cfg.limit = Some(1);
    assert_eq!(align_data::column_numbers(&cfg, &[], "difficulty").unwrap(), vec![5.0]);
    let err = align_data::column_numbers(&cfg, &[], "missing").unwrap_err().to_string();
    assert!(err.contains("rows.jsonl:3") && err.contains("field `missing`"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
