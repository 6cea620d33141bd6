//! Math answer grading: the r1_zero reward (format and answer, CS336 / "understand-r1-zero")
//! with the numeric equivalence the reference grader applies
//! ("1,000", "1000", "1000.0", "$1000" are one answer).

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// The r1_zero reward of one response.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct R1ZeroScore {
    /// 1 iff the response contains "</think> <answer>" (one space) and "</answer>".
    pub format_reward: f64,
    /// 1 iff well formatted and the answer equals the ground truth.
    pub answer_reward: f64,
    /// = answer_reward: a well-formatted wrong answer scores 1/0/0, never a format bonus.
    pub reward: f64,
}

/// Grade a response (the text after the prompt's "Assistant: <think>") against a ground
/// truth: format iff "</think> <answer>" and "</answer>" both appear; the answer is the text
/// after the last "<answer>" with "</answer>" removed, or the content of its `\boxed{…}`.
pub fn r1_zero_reward(response: &str, ground_truth: &str) -> R1ZeroScore {
    if !(response.contains("</think> <answer>") && response.contains("</answer>")) {
        return R1ZeroScore::default();
    }
    let after = response.rsplit("<answer>").next().unwrap_or("");
    let answer = after.replace("</answer>", "");
    let answer = if answer.contains("\\boxed") {
        match last_boxed(&answer) {
            Some(a) => a,
            None => return R1ZeroScore { format_reward: 1.0, answer_reward: 0.0, reward: 0.0 },
        }
    } else {
        answer
    };
    let correct = answers_equal(&answer, ground_truth);
    let a = if correct { 1.0 } else { 0.0 };
    R1ZeroScore { format_reward: 1.0, answer_reward: a, reward: a }
}

/// The content of the last `\boxed{…}` (or `\fbox{…}`), braces balanced; `None` if unclosed.
pub fn last_boxed(s: &str) -> Option<String> {
    let start = s.rfind("\\boxed").or_else(|| s.rfind("\\fbox"))?;
    let rest = &s[start..];
    let open = rest.find('{')?;
    // `\boxed 5` (no braces) is the next token
    if rest[..open].contains(' ') || open > 6 {
        let token = rest.split_whitespace().nth(1)?;
        return Some(token.trim_end_matches('$').to_string());
    }
    let mut depth = 0usize;
    for (i, c) in rest[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[open + 1..open + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

const UNITS: &[&str] = &[
    "degrees",
    "degree",
    "cm",
    "centimeters",
    "centimeter",
    "meters",
    "meter",
    "miles",
    "mile",
    "seconds",
    "second",
    "minutes",
    "minute",
    "hours",
    "hour",
    "days",
    "day",
    "weeks",
    "week",
    "months",
    "month",
    "years",
    "year",
    "feet",
    "foot",
    "inches",
    "inch",
    "yards",
    "yard",
    "dollars",
    "dollar",
    "cents",
    "cent",
    "units",
    "unit",
];

/// `1,234,567` → `1234567`: commas between a digit and exactly three digits.
fn strip_thousands_commas(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &ch) in c.iter().enumerate() {
        let grouped = ch == ','
            && i > 0
            && c[i - 1].is_ascii_digit()
            && c.len() >= i + 4
            && c[i + 1..i + 4].iter().all(|d| d.is_ascii_digit())
            && c.get(i + 4).is_none_or(|d| !d.is_ascii_digit());
        if !grouped {
            out.push(ch);
        }
    }
    out
}

/// The answer in a canonical written form: LaTeX and currency noise, units, thousands
/// separators, a leading `x =` and spaces removed; integral numbers written as integers.
pub fn normalize_answer(s: &str) -> String {
    let mut s = s.trim().to_string();
    // \text{…} keeps its content
    while let Some(i) = s.find("\\text{") {
        let Some(j) = s[i..].find('}') else { break };
        s = format!("{}{}{}", &s[..i], &s[i + 6..i + j], &s[i + j + 1..]);
    }
    for noise in ["\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ", "°"] {
        s = s.replace(noise, "");
    }
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    let mut s = strip_thousands_commas(&s).to_lowercase();
    // trailing unit words ("5 dollars", "12 hours")
    loop {
        let t = s.trim_end().trim_end_matches('.').trim_end().to_string();
        match UNITS.iter().find(|u| t.ends_with(*u) && t[..t.len() - u.len()].trim_end().len() < t.len() - u.len()) {
            Some(u) => s = t[..t.len() - u.len()].to_string(),
            None => {
                s = t;
                break;
            }
        }
    }
    // `x = 5` → `5`
    if let Some((lhs, rhs)) = s.split_once('=')
        && lhs.trim().len() <= 2
        && lhs.trim().chars().all(|c| c.is_ascii_alphabetic())
    {
        s = rhs.to_string();
    }
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let s = s.trim_end_matches('.').to_string();
    match parse_number(&s) {
        Some(Number { value, fraction: false }) if (value - value.round()).abs() <= 1e-7 && value.abs() < 1e15 => {
            format!("{}", value.round() as i64)
        }
        _ => s,
    }
}

struct Number {
    value: f64,
    /// written as a fraction (`a/b`, `\frac{a}{b}`)
    fraction: bool,
}

fn parse_number(s: &str) -> Option<Number> {
    if let Ok(v) = s.parse::<f64>()
        && v.is_finite()
        && !s.contains(['e', 'E', 'i', 'n'])
    {
        return Some(Number { value: v, fraction: false });
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let (a, b) = if let Some(inner) = body.strip_prefix("\\frac{") {
        let (a, rest) = inner.split_once("}{")?;
        (a.to_string(), rest.strip_suffix('}')?.to_string())
    } else {
        let (a, b) = body.split_once('/')?;
        (a.to_string(), b.to_string())
    };
    let (a, b) = (a.parse::<f64>().ok()?, b.parse::<f64>().ok()?);
    if b == 0.0 {
        return None;
    }
    Some(Number { value: if neg { -a / b } else { a / b }, fraction: true })
}

/// Whether a model's answer equals the ground truth: the same normalised text, or the same
/// number (an integral ground truth needs an integral answer).
pub fn answers_equal(given: &str, ground_truth: &str) -> bool {
    let (g, t) = (normalize_answer(given), normalize_answer(ground_truth));
    if g.is_empty() {
        return false;
    }
    if g == t {
        return true;
    }
    match (parse_number(&g), parse_number(&t)) {
        (Some(a), Some(b)) => {
            let is_int = |x: f64| (x - x.round()).abs() <= 1e-7;
            if is_int(b.value) != is_int(a.value) {
                return false;
            }
            (a.value - b.value).abs() <= 1e-9 * b.value.abs().max(1.0)
        }
        _ => false,
    }
}

/// `strict-match`: the number after "#### " (lm-eval's regex `#### (\-?[0-9\.\,]+)`, first
/// match); `flexible-extract`: the last number-like span (`(-?[$0-9.,]{2,})|(-?[0-9]+)`).
/// Both then compare as lm-eval's `exact_match` with `,`, `$`, a leading "… #### " and a
/// trailing "." ignored.
pub fn gsm8k_lm_eval_matches(response: &str, ground_truth: &str) -> (f64, f64) {
    static STRICT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#### (\-?[0-9\.\,]+)").expect("valid regex"));
    static FLEXIBLE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").expect("valid regex"));
    let (strict, flexible) = (&*STRICT, &*FLEXIBLE);
    let clean = |s: &str| -> String {
        let s = s.replace([',', '$'], "");
        let s = match s.rfind("#### ") {
            Some(i) => s[i + 5..].to_string(),
            None => s,
        };
        s.trim().trim_end_matches('.').to_string()
    };
    let gt = clean(ground_truth);
    let strict_pick = strict.captures(response).and_then(|c| c.get(1)).map(|m| m.as_str().to_string());
    let flexible_pick = flexible
        .captures_iter(response)
        .last()
        .and_then(|c| c.get(1).or_else(|| c.get(2)))
        .map(|m| m.as_str().to_string());
    let hit = |p: Option<String>| if p.is_some_and(|p| clean(&p) == gt) { 1.0 } else { 0.0 };
    (hit(strict_pick), hit(flexible_pick))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str, gt: &str) -> (f64, f64, f64) {
        let x = r1_zero_reward(s, gt);
        (x.format_reward, x.answer_reward, x.reward)
    }

    #[test]
    fn format_needs_the_exact_tags() {
        assert_eq!(r("2+2=4 </think> <answer>4</answer>", "4"), (1.0, 1.0, 1.0));
        assert_eq!(r("2+2=4 </think><answer>4</answer>", "4"), (0.0, 0.0, 0.0), "no space");
        assert_eq!(r("2+2=4 </think>  <answer>4</answer>", "4"), (0.0, 0.0, 0.0), "two spaces");
        assert_eq!(r("2+2=4 </think> <answer>4", "4"), (0.0, 0.0, 0.0), "unclosed");
        assert_eq!(r("<answer>4</answer>", "4"), (0.0, 0.0, 0.0), "no think");
        assert_eq!(r("x </think> <answer>5</answer>", "4"), (1.0, 0.0, 0.0), "formatted, wrong");
        assert_eq!(r("x </think> <answer></answer>", "4"), (1.0, 0.0, 0.0), "empty answer");
    }

    #[test]
    fn the_answer_is_after_the_last_answer_tag_or_boxed() {
        assert_eq!(r("</think> <answer>3</answer> then <answer>4</answer>", "4"), (1.0, 1.0, 1.0));
        assert_eq!(r("</think> <answer>so \\boxed{42}</answer>", "42"), (1.0, 1.0, 1.0));
        assert_eq!(r("</think> <answer>\\boxed{\\frac{1}{2}}</answer>", "1/2"), (1.0, 1.0, 1.0));
        assert_eq!(r("</think> <answer>\\boxed{3} or \\boxed{4}</answer>", "4"), (1.0, 1.0, 1.0));
        assert_eq!(r("</think> <answer>\\boxed{4</answer>", "4"), (1.0, 0.0, 0.0), "unclosed box");
        assert_eq!(last_boxed("\\boxed{a{b}c}"), Some("a{b}c".into()));
    }

    #[test]
    fn numbers_written_differently_are_equal() {
        for a in [
            "1,000",
            "1000",
            "1000.0",
            "$1000",
            "\\$1,000",
            " 1000 ",
            "1000.",
            "1,000.00",
            "$1,000 dollars",
            "x = 1000",
            "\\text{1000}",
        ] {
            assert!(answers_equal(a, "1000"), "{a:?}");
        }
        assert!(answers_equal("18 hours", "18"));
        assert!(answers_equal("-5", "-5"));
        assert!(answers_equal("50%", "50"));
        assert!(answers_equal("0.5", "0.50"));
        assert!(answers_equal("\\frac{3}{4}", "3/4"));
        assert!(answers_equal("\\dfrac{3}{4}", "0.75"));
        assert!(!answers_equal("1000.5", "1000"));
        assert!(!answers_equal("100", "1000"));
        assert!(!answers_equal("1,00", "100"), "a comma that is not a thousands separator");
        assert!(!answers_equal("", "0"));
        assert!(!answers_equal("7.5", "8"), "an integral ground truth needs an integral answer");
        assert!(answers_equal("Paris", "paris"));
    }
}
