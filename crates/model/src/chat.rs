//! Chat templates, rendered with minijinja the way transformers renders them:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`.strip()`, `.split()`,
//! `.startswith()`, …), `raise_exception`, `strftime_now`, and a `tojson` that writes
//! JSON like Python's `json.dumps` (no HTML escaping, key order kept, optional indent).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

fn tojson(value: minijinja::Value, indent: Option<usize>) -> std::result::Result<String, minijinja::Error> {
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(match indent {
        None => python_json(&v, None, 0),
        Some(n) => python_json(&v, Some(n), 0),
    })
}

/// `json.dumps(v, ensure_ascii=False, indent=indent)`: `", "` and `": "` separators
/// without an indent, newlines and `indent` spaces with one.
fn python_json(v: &Value, indent: Option<usize>, level: usize) -> String {
    let (open_sep, item_sep, close_sep) = match indent {
        None => (String::new(), ", ".to_string(), String::new()),
        Some(n) => (
            format!("\n{}", " ".repeat(n * (level + 1))),
            format!(",\n{}", " ".repeat(n * (level + 1))),
            format!("\n{}", " ".repeat(n * level)),
        ),
    };
    match v {
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(|x| python_json(x, indent, level + 1)).collect();
            format!("[{open_sep}{}{close_sep}]", items.join(&item_sep))
        }
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{}: {}", Value::String(k.clone()), python_json(x, indent, level + 1)))
                .collect();
            format!("{{{open_sep}{}{close_sep}}}", items.join(&item_sep))
        }
        other => other.to_string(),
    }
}

/// Widest `indent` a template may ask for: minijinja's own filter would build any width
/// (`indent(1000000000)` is a gigabyte per line), and a template comes from a file.
const MAX_INDENT: usize = 1024;

/// minijinja's `indent`, refusing widths beyond [`MAX_INDENT`].
fn bounded_indent(
    value: minijinja::value::StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let asked = match width {
        Some(w) => Some(w),
        None => kwargs.get::<Option<usize>>("width")?,
    };
    if asked.is_some_and(|w| w > MAX_INDENT) {
        return Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("indent width {} is beyond {MAX_INDENT}", asked.unwrap_or_default()),
        ));
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date" in system prompts; a fixed, documented
            // date keeps renders reproducible across runs.
            fmt.replace("%Y", "2026")
                .replace("%m", "01")
                .replace("%d", "01")
                .replace("%B", "January")
                .replace("%b", "Jan")
        });
        env.add_filter("tojson", tojson);
        env.add_filter("indent", bounded_indent);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("does not compile: {e}")))?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token, eos_token })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation. `extra` adds variables (e.g. `{"enable_thinking": false}`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: Option<&Value>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let mut ctx = serde_json::json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token.clone().unwrap_or_default(),
            "eos_token": self.eos_token.clone().unwrap_or_default(),
        });
        if let Some(Value::Object(extra)) = extra {
            for (k, v) in extra {
                ctx[k] = v.clone();
            }
        }
        tmpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| ModelError::ChatTemplate(format!("rendering failed: {e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_with_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            None,
            None,
        )
        .unwrap();
        let s = t.render(&[ChatMessage::new("user", "Hi")], true, None).unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_errors() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}{{ m.content.strip().split('x')[0] | tojson }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[ChatMessage::new("user", "  a<bxc ")], false, None).unwrap(), "\"a<b\"");
        let e = t.render(&[ChatMessage::new("bad", "")], false, None).unwrap_err();
        assert!(e.to_string().contains("no bad roles"), "{e}");
    }
}
