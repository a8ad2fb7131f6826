//! What a destination can store, checked in one streaming pass over an entry's
//! JSON (no `serde_json::Value` is built): the HTTP door refuses what would
//! otherwise become a dead letter for its content, and `write_batch` screens
//! with the same rules (entries from embedders never passed the door).
//!
//! Every destination needs: a JSON object; every string valid Unicode (a lone
//! surrogate escape such as `"\ud800"` is not); every number representable as a
//! 64-bit float or integer (`1e400` is not). Postgres also refuses NUL (U+0000)
//! in any text: `jsonb` strings and keys, `subject`, `idempotency_key`.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Why an entry cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntry {
    /// `payload`, `subject` or `idempotency_key`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for InvalidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A top-level field of the payload the door reads (`subject`,
/// `idempotency_key`), as found in the same pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Field {
    /// Absent or `null`.
    #[default]
    Absent,
    /// A string.
    Text(String),
    /// Any other JSON type.
    NotText,
}

/// The fields the door needs, read while checking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PayloadFields {
    /// Top-level `subject`.
    pub subject: Field,
    /// Top-level `idempotency_key`.
    pub idempotency_key: Field,
}

/// Check a payload (the entry's JSON text) by the rules of every destination,
/// plus Postgres' NUL rule when `no_nul`; answer its `subject` and
/// `idempotency_key` fields.
pub fn check_payload(payload: &[u8], no_nul: bool) -> Result<PayloadFields, InvalidEntry> {
    let invalid = |reason: String| InvalidEntry {
        field: "payload",
        reason,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let fields = de
        .deserialize_any(Top { no_nul })
        .map_err(|e| invalid(e.to_string()))?;
    de.end().map_err(|e| invalid(e.to_string()))?;
    Ok(fields)
}

/// Check the text fields stored beside the payload.
pub fn check_text(
    field: &'static str,
    value: Option<&str>,
    no_nul: bool,
) -> Result<(), InvalidEntry> {
    if no_nul && value.is_some_and(|v| v.contains('\0')) {
        return Err(InvalidEntry {
            field,
            reason: "contains a NUL character (U+0000), which Postgres cannot store".into(),
        });
    }
    Ok(())
}

const NUL: &str = "contains a NUL character (\\u0000), which Postgres jsonb cannot store";

/// The top level: an object; records `subject` and `idempotency_key`.
struct Top {
    no_nul: bool,
}

impl<'de> Visitor<'de> for Top {
    type Value = PayloadFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PayloadFields, A::Error> {
        let mut out = PayloadFields::default();
        while let Some(key) = map.next_key_seed(Text {
            no_nul: self.no_nul,
        })? {
            let slot = match key.as_str() {
                "subject" => Some(&mut out.subject),
                "idempotency_key" => Some(&mut out.idempotency_key),
                _ => None,
            };
            match slot {
                Some(slot) => {
                    *slot = map.next_value_seed(FieldSeed {
                        no_nul: self.no_nul,
                    })?
                }
                None => map.next_value_seed(Any {
                    no_nul: self.no_nul,
                })?,
            }
        }
        Ok(out)
    }
}

/// A string (a key), checked; answered owned only when it is short (keys that
/// name our fields are), else empty.
struct Text {
    no_nul: bool,
}

impl<'de> DeserializeSeed<'de> for Text {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Text {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if self.no_nul && v.contains('\0') {
            return Err(E::custom(NUL));
        }
        Ok(if v.len() <= 32 {
            v.to_owned()
        } else {
            String::new()
        })
    }
}

/// The value of `subject` / `idempotency_key`.
struct FieldSeed {
    no_nul: bool,
}

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Field;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Field;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
        if self.no_nul && v.contains('\0') {
            return Err(E::custom(NUL));
        }
        Ok(Field::Text(v.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Field, E> {
        Ok(Field::Absent)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field, E> {
        Ok(Field::NotText)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Field, E> {
        Ok(Field::NotText)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Field, E> {
        Ok(Field::NotText)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Field, E> {
        Ok(Field::NotText)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field, A::Error> {
        Any {
            no_nul: self.no_nul,
        }
        .visit_seq(seq)?;
        Ok(Field::NotText)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field, A::Error> {
        Any {
            no_nul: self.no_nul,
        }
        .visit_map(map)?;
        Ok(Field::NotText)
    }
}

/// Any value, checked all the way down (not `IgnoredAny`: it skips strings
/// without decoding their escapes, so a lone surrogate would pass).
#[derive(Clone, Copy)]
struct Any {
    no_nul: bool,
}

impl<'de> DeserializeSeed<'de> for Any {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Any {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.no_nul && v.contains('\0') {
            return Err(E::custom(NUL));
        }
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
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("a number out of range"))
        }
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_key_seed(Text {
                no_nul: self.no_nul,
            })?
            .is_some()
        {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_no_destination_can_store_is_named() {
        for (payload, want) in [
            (r#"{"a":"\ud800"}"#, "escape"),
            (r#"{"a":"\udc00x"}"#, "surrogate"),
            (r#"{"\ud800":1}"#, "escape"),
            (r#"{"n":1e400}"#, "out of range"),
            (r#"{"n":-1e400}"#, "out of range"),
            (r#"[1]"#, "a JSON object"),
            (r#"{"a":1} x"#, "trailing"),
        ] {
            let e = check_payload(payload.as_bytes(), false).unwrap_err();
            assert!(
                e.reason.contains(want) || e.reason.contains("surrogate"),
                "{payload}: {e}"
            );
        }
    }

    #[test]
    fn postgres_refuses_nul_anywhere() {
        for payload in [
            r#"{"a":"x\u0000"}"#,
            r#"{"a\u0000":1}"#,
            r#"{"a":[{"b":"\u0000"}]}"#,
        ] {
            assert!(
                check_payload(payload.as_bytes(), false).is_ok(),
                "{payload}"
            );
            let e = check_payload(payload.as_bytes(), true).unwrap_err();
            assert!(e.reason.contains("NUL"), "{payload}: {e}");
        }
        assert!(check_text("subject", Some("a\0b"), true).is_err());
        assert!(check_text("subject", Some("a\0b"), false).is_ok());
    }

    #[test]
    fn fields_are_read_in_the_same_pass() {
        let f = check_payload(
            br#"{"subject":"s","x":{"subject":"inner"},"idempotency_key":7}"#,
            true,
        )
        .unwrap();
        assert_eq!(f.subject, Field::Text("s".into()));
        assert_eq!(f.idempotency_key, Field::NotText);
        let f = check_payload(br#"{"subject":null,"n":1.5e300,"e":"\ud83d\ude00"}"#, true).unwrap();
        assert_eq!(f.subject, Field::Absent);
    }
}
