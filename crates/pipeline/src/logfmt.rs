//! Floats in log lines at about five significant digits (`metrics.jsonl` keeps every digit).

use std::collections::BTreeMap;
use std::fmt;

/// A float shown with five significant digits: fixed notation from 1e-4 to 1e6, scientific
/// outside, trailing zeros dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sig(pub f64);

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.0;
        if x == 0.0 || !x.is_finite() {
            return write!(f, "{x}");
        }
        let magnitude = x.abs().log10().floor() as i32;
        if !(-4..6).contains(&magnitude) {
            return write!(f, "{x:.4e}");
        }
        let text = format!("{x:.*}", (4 - magnitude).max(0) as usize);
        let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
        f.write_str(text)
    }
}

/// An optional value for a log field: its [`Sig`], or `-`.
pub fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| Sig(v).to_string())
}

/// A metric map as `{name: value, …}` with [`Sig`] values.
pub fn map(m: &BTreeMap<String, f64>) -> String {
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", Sig(*v))).collect();
    format!("{{{}}}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_significant_digits() {
        let s = |x: f64| Sig(x).to_string();
        assert_eq!(s(0.123456789), "0.12346");
        assert_eq!(s(1.0), "1");
        assert_eq!(s(12345.678), "12346");
        assert_eq!(s(0.30000000000000004), "0.3");
        assert_eq!(s(-2.5e-7), "-2.5000e-7");
        assert_eq!(s(3.0e9), "3.0000e9");
        assert_eq!(s(0.0), "0");
        assert_eq!(s(f64::NAN), "NaN");
        assert_eq!(opt(None), "-");
        assert_eq!(map(&[("a".to_string(), 0.1234567)].into()), "{a: 0.12346}");
    }
}
