//! The words of full-text search, defined once in Rust and used on both sides:
//! a payload's words are computed here at delivery and stored in the
//! destination's index (SQLite FTS5 configured to split at spaces only,
//! Postgres `array_to_tsvector`), and a query's `q` is split by the same
//! function, so whatever a destination's own tokenizer or locale would do,
//! every word of any script — Devanagari with its combining marks, Arabic, CJK,
//! emoji, accented Latin — is found by exactly that word.
//!
//! A word is a Unicode word segment (UAX #29, so `can't` and `3.14` stay whole
//! and each Han ideograph is a word) with whitespace and control characters
//! removed, that is not only punctuation; lower-cased (`str::to_lowercase`);
//! at most [`MAX_WORD_BYTES`]. A payload's words are its JSON string values'
//! words (keys are not indexed), each once, up to [`MAX_INDEXED_BYTES`] in
//! all: Postgres cannot hold a `tsvector` past 1 MiB, and an entry accepted
//! must stay deliverable.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::fmt;
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
use unicode_segmentation::UnicodeSegmentation;

/// A longer word is cut (at a character boundary) to this many bytes, on both
/// sides alike.
pub const MAX_WORD_BYTES: usize = 200;
/// Distinct words of one payload indexed, in bytes; the rest are not searchable.
pub const MAX_INDEXED_BYTES: usize = 256 * 1024;
/// Words of a query used (every one must match).
pub const MAX_QUERY_WORDS: usize = 32;

/// The words of `text`, in order.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    let segments: Box<dyn Iterator<Item = &str>> = if text.is_ascii() {
        Box::new(ascii_segments(text))
    } else {
        Box::new(text.split_word_bounds())
    };
    segments
        .flat_map(|seg| seg.split(|c: char| c.is_whitespace() || c.is_control()))
        .filter(|w| {
            w.chars()
                .any(|c| c.general_category_group() != GeneralCategoryGroup::Punctuation)
        })
        .map(|w| {
            let mut w = w.to_lowercase();
            if w.len() > MAX_WORD_BYTES {
                let mut end = MAX_WORD_BYTES;
                while !w.is_char_boundary(end) {
                    end -= 1;
                }
                w.truncate(end);
            }
            w
        })
}

/// The word segments of ASCII text, the same as `split_word_bounds` gives
/// up to whitespace and control characters (which `words` drops), found
/// faster: in ASCII a space or control character is a boundary on both sides
/// (UAX #29 joins across neither), so each run between them is segmented
/// alone, and a run of letters and digits is one segment (WB5, WB8-WB10).
/// Most text is such runs; the rest goes through `split_word_bounds`.
fn ascii_segments(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c == ' ' || c.is_ascii_control())
        .filter(|run| !run.is_empty())
        .flat_map(|run| {
            let one = run.bytes().all(|b| b.is_ascii_alphanumeric());
            let (fast, slow) = if one { (Some(run), "") } else { (None, run) };
            fast.into_iter().chain(slow.split_word_bounds())
        })
}

/// The distinct words of a payload's string values, joined by single spaces
/// (no word contains one). The payload is JSON already screened; anything that
/// does not parse has no words.
pub fn payload_words(payload: &[u8]) -> String {
    let mut sink = Sink::default();
    let mut de = serde_json::Deserializer::from_slice(payload);
    if de.deserialize_any(Strings(&mut sink)).is_err() {
        return String::new();
    }
    sink.out
}

/// The words of a query, at most [`MAX_QUERY_WORDS`], distinct.
pub(crate) fn query_words(q: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    words(q)
        .filter(|w| seen.insert(w.clone()))
        .take(MAX_QUERY_WORDS)
        .collect()
}

/// An FTS5 query matching rows that have every word: each word a quoted
/// string (`"` doubled), so user input is never query syntax.
pub(crate) fn fts5_query(words: &[String]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
        .collect();
    quoted.join(" ")
}

/// A `tsquery` literal matching rows that have every word: each word a quoted
/// lexeme (`'` doubled, `\` escaped), taken as is (no parser, no dictionary).
pub(crate) fn tsquery(words: &[String]) -> String {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\\', "\\\\").replace('\'', "''")))
        .collect();
    quoted.join(" & ")
}

#[derive(Default)]
struct Sink {
    seen: HashSet<String>,
    out: String,
}

impl Sink {
    fn add(&mut self, text: &str) {
        for w in words(text) {
            if self.out.len() + w.len() + 1 > MAX_INDEXED_BYTES {
                return;
            }
            if !self.seen.contains(&w) {
                if !self.out.is_empty() {
                    self.out.push(' ');
                }
                self.out.push_str(&w);
                self.seen.insert(w);
            }
        }
    }
}

/// Visits every string value (not keys) of a JSON document.
struct Strings<'a>(&'a mut Sink);

impl<'de> DeserializeSeed<'de> for Strings<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strings<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.add(v);
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Strings(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value_seed(Strings(&mut *self.0))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        words(s).collect()
    }

    #[test]
    fn words_of_every_script_stay_whole() {
        assert_eq!(w("नमस्ते दुनिया"), ["नमस्ते", "दुनिया"]);
        assert_eq!(w("مرحبا بالعالم"), ["مرحبا", "بالعالم"]);
        assert_eq!(w("Grüße, CAFÉ!"), ["grüße", "café"]);
        assert_eq!(w("東京タワー"), ["東", "京", "タワー"]);
        assert_eq!(w("party 🎉🎉 time"), ["party", "🎉", "🎉", "time"]);
        assert_eq!(w("can't 3.14 -- ..."), ["can't", "3.14"]);
    }

    #[test]
    fn query_syntax_is_never_syntax() {
        let q = query_words(r#"hello "world" OR x* 'a'\b"#);
        assert_eq!(q, ["hello", "world", "or", "x", "a", "b"]);
        assert_eq!(fts5_query(&["a\"b".into()]), r#""a""b""#);
        assert_eq!(
            tsquery(&["it's".into(), "a\\b".into()]),
            r"'it''s' & 'a\\b'"
        );
        assert!(query_words("  ** ,, ").is_empty());
    }

    #[test]
    fn payload_words_are_its_string_values_once() {
        let p = br#"{"k":"Alpha beta","key":["alpha",{"x":"gamma"}],"n":1,"b":true}"#;
        assert_eq!(payload_words(p), "alpha beta gamma");
    }

    #[test]
    fn long_words_and_long_payloads_are_capped() {
        let long = "a".repeat(1000);
        assert_eq!(w(&long)[0].len(), MAX_WORD_BYTES);
        let many: Vec<String> = (0..100_000).map(|i| format!("w{i:08x}")).collect();
        let p = serde_json::json!({ "t": many.join(" ") }).to_string();
        let indexed = payload_words(p.as_bytes());
        assert!(indexed.len() <= MAX_INDEXED_BYTES);
        assert!(indexed.len() > MAX_INDEXED_BYTES - 20);
    }

    /// The ASCII shortcut finds exactly the words UAX #29 segmentation finds.
    #[test]
    fn ascii_text_has_the_words_of_the_full_segmentation() {
        use proptest::prelude::*;
        let full = |t: &str| -> Vec<String> {
            let mut only_uax = String::from(t);
            // A non-ASCII character far away forces the general path; the
            // words around it are compared without it.
            only_uax.push_str(" \u{e9}");
            let mut v: Vec<String> = words(&only_uax).collect();
            assert_eq!(v.pop().as_deref(), Some("\u{e9}"));
            v
        };
        let cases = [
            "can't 3.14 e-mail a_b _x x_ 1,000 a:b a.b. ..a $5 +1 <=> ~^|` foo@bar.com",
            "tab\tnew\nline\r\n  two  spaces \x0b\x0c\x7f end",
            "ALL CAPS MiXeD 0x1F 42nd",
        ];
        for t in cases {
            assert_eq!(words(t).collect::<Vec<_>>(), full(t), "{t:?}");
        }
        proptest!(ProptestConfig::with_cases(2000), |(t in "[\\x00-\\x7f]{0,40}")| {
            prop_assert_eq!(words(&t).collect::<Vec<_>>(), full(&t));
        });
    }
}
