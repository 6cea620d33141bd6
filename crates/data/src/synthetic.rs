//! The built-in demo's task: arithmetic word problems generated from a seed, answered in the
//! r1_zero format (`… </think> <answer> N </answer>`), so a tiny model can learn it on a CPU
//! in minutes and every stage has a metric to move: SFT rows, preference pairs (the right
//! answer against a wrong one) and prompt + answer rows for RL and evaluation.
//!
//! Every word is separated by one space (punctuation too), so the demo's word-level
//! tokenizer covers the text exactly and decoding gives it back.

use align_model::SplitMix64;
use serde_json::{Value, json};

const NAMES: [&str; 8] = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana"];
const ITEMS: [&str; 8] = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles"];
/// Words of the templates, the prompt suffix, the answer format, the scored conversations'
/// critiques, and the critique task and score control string as the demo writes them.
const WORDS: &str = "has and gets more . How many does have ? gives away are left buys bags with in each \
                     total <think> </think> <answer> </answer> + - * = \
                     The the working is right but missing wrong : answer should be \
                     Critique reply below , then rate it from to User: Assistant: Score: <score> </score>";

/// One problem: `a op b`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArithmeticProblem {
    pub question: String,
    pub a: i64,
    pub b: i64,
    pub op: char,
}

impl ArithmeticProblem {
    pub fn answer(&self) -> i64 {
        match self.op {
            '+' => self.a + self.b,
            '-' => self.a - self.b,
            _ => self.a * self.b,
        }
    }

    /// What the model is given: the question, then the opening think tag.
    pub fn prompt(&self) -> String {
        format!("{} <think>", self.question)
    }

    /// The worked solution in the r1_zero format (a completion: leading space).
    pub fn solution(&self) -> String {
        self.solution_with(self.answer())
    }

    /// The same working with another final answer (a rejected completion).
    pub fn solution_with(&self, answer: i64) -> String {
        format!(" {} {} {} = {answer} </think> <answer> {answer} </answer>", self.a, self.op, self.b)
    }
}

/// `n` problems from `seed`: sums and differences of operands up to `max_operand`, products
/// of operands up to 10.
pub fn arithmetic_problems(seed: u64, n: usize, max_operand: i64) -> Vec<ArithmeticProblem> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let mut pick = |k: usize| (rng.next_u64() % k as u64) as usize;
            let (name, item, kind) = (NAMES[pick(NAMES.len())], ITEMS[pick(ITEMS.len())], pick(3));
            let mut operand = |max: i64| 1 + pick(max as usize) as i64;
            match kind {
                0 => {
                    let (a, b) = (operand(max_operand), operand(max_operand));
                    ArithmeticProblem {
                        question: format!(
                            "{name} has {a} {item} and gets {b} more . How many {item} does {name} have ?"
                        ),
                        a,
                        b,
                        op: '+',
                    }
                }
                1 => {
                    let (x, y) = (operand(max_operand), operand(max_operand));
                    let (a, b) = (x.max(y), x.min(y));
                    ArithmeticProblem {
                        question: format!("{name} has {a} {item} and gives away {b} . How many {item} are left ?"),
                        a,
                        b,
                        op: '-',
                    }
                }
                _ => {
                    let (a, b) = (operand(max_operand.min(10)), operand(max_operand.min(10)));
                    ArithmeticProblem {
                        question: format!(
                            "{name} buys {a} bags with {b} {item} in each . How many {item} does {name} have in total ?"
                        ),
                        a,
                        b,
                        op: '*',
                    }
                }
            }
        })
        .collect()
}

/// Every word the problems, prompts and solutions (right or wrong, within ±`max_operand`
/// of the answer) can contain: the demo tokenizer's vocabulary.
pub fn arithmetic_vocabulary(max_operand: i64) -> Vec<String> {
    let largest = (2 * max_operand).max(max_operand.min(10).pow(2)) + max_operand;
    NAMES
        .iter()
        .chain(ITEMS.iter())
        .map(|s| s.to_string())
        .chain(WORDS.split_whitespace().map(str::to_string))
        .chain((-max_operand..=largest).map(|k| k.to_string()))
        .collect()
}

/// A wrong answer near the right one (never equal to it).
pub fn wrong_answer(p: &ArithmeticProblem, rng: &mut SplitMix64, spread: i64) -> i64 {
    let offset = 1 + (rng.next_u64() % spread.max(1) as u64) as i64;
    if rng.next_u64().is_multiple_of(2) { p.answer() + offset } else { p.answer() - offset }
}

/// SFT rows: `{prompt, completion}` with the worked solution.
pub fn sft_rows(problems: &[ArithmeticProblem]) -> Vec<Value> {
    problems.iter().map(|p| json!({"prompt": p.prompt(), "completion": p.solution()})).collect()
}

/// Preference rows: the worked solution against the same working with a wrong answer.
pub fn preference_rows(problems: &[ArithmeticProblem], seed: u64, spread: i64) -> Vec<Value> {
    let mut rng = SplitMix64::new(seed);
    problems
        .iter()
        .map(|p| {
            let wrong = wrong_answer(p, &mut rng, spread);
            json!({"prompt": p.prompt(), "chosen": p.solution(), "rejected": p.solution_with(wrong)})
        })
        .collect()
}

/// The three kinds of reply a scored conversation holds, and their `meta_eval_score`
/// (0–5): the score follows the answer's correctness first and its style second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// The working and the right answer: 5.
    Worked,
    /// The right answer without the working: 3.
    Bare,
    /// The working with a wrong answer: 1.
    Wrong,
}

impl ReplyKind {
    pub fn score(self) -> f64 {
        match self {
            ReplyKind::Worked => 5.0,
            ReplyKind::Bare => 3.0,
            ReplyKind::Wrong => 1.0,
        }
    }
}

/// A reply of `kind` to `p`, and the critique (`score_reason`) a grader writes of it.
pub fn scored_reply(p: &ArithmeticProblem, kind: ReplyKind, rng: &mut SplitMix64, spread: i64) -> (String, String) {
    let (a, op, b, n) = (p.a, p.op, p.b, p.answer());
    match kind {
        ReplyKind::Worked => (p.solution(), format!("The working {a} {op} {b} = {n} is right .")),
        ReplyKind::Bare => (
            format!(" </think> <answer> {n} </answer>"),
            format!("The answer {n} is right but the working is missing ."),
        ),
        ReplyKind::Wrong => {
            let w = wrong_answer(p, rng, spread);
            (p.solution_with(w), format!("The working is wrong : {a} {op} {b} should be {n} ."))
        }
    }
}

/// Scored conversations (`conversation`, `meta_eval_score`, `score_reason`): each problem
/// once, its reply's kind cycling worked, bare, wrong, so every score is as common.
pub fn scored_conversation_rows(problems: &[ArithmeticProblem], seed: u64, spread: i64) -> Vec<Value> {
    let mut rng = SplitMix64::new(seed);
    let kinds = [ReplyKind::Worked, ReplyKind::Bare, ReplyKind::Wrong];
    problems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let kind = kinds[i % kinds.len()];
            let (reply, reason) = scored_reply(p, kind, &mut rng, spread);
            json!({
                "conversation": [
                    {"role": "human", "content": p.prompt()},
                    {"role": "assistant", "content": reply.trim_start()},
                ],
                "meta_eval_score": kind.score(),
                "score_reason": reason,
                "answer": p.answer().to_string(),
            })
        })
        .collect()
}

/// RL and evaluation rows: `{prompt, answer}`.
pub fn prompt_answer_rows(problems: &[ArithmeticProblem]) -> Vec<Value> {
    problems.iter().map(|p| json!({"prompt": p.prompt(), "answer": p.answer().to_string()})).collect()
}
