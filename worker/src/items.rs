//! The body of a `POST /items` batch, parsed into the store's items.

use std::borrow::Cow;
use std::fmt;

use countapp_store::Item;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Parses the body of a `POST /items` batch: a JSON array of `{"id": string, "tenant": string}`.
///
/// One pass over the bytes, with no intermediate JSON tree; ids and tenants borrow from `body`
/// unless they contain escapes. All or nothing: the first problem, in body order, rejects the
/// whole batch, and the error says which item it was in. Extra fields in an item are ignored
/// (clients may send more than we need); a field given twice is an error, since which value
/// was meant is unknowable.
pub fn parse_batch(body: &[u8], max_key_bytes: usize) -> Result<Vec<Item<'_>>, BatchError> {
    let mut failure = None;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = BatchSeed { max_key_bytes, failure: &mut failure }
        .deserialize(&mut deserializer)
        .and_then(|items| deserializer.end().map(|()| items));
    // A visitor that finds a problem records it in `failure` and aborts the parse with a
    // placeholder error, because serde errors cannot carry a structured reason.
    match (parsed, failure) {
        (_, Some(failure)) => Err(failure),
        (Ok(items), None) => Ok(items),
        (Err(err), None) => Err(BatchError::Malformed(err)),
    }
}

/// Why a `POST /items` body was rejected; its message is what the client sees in the 400.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The body is not JSON, or has something after the array.
    #[error("malformed JSON: {0}")]
    Malformed(serde_json::Error),
    /// The body is JSON, but not an array.
    #[error("the body must be a JSON array of items, got {0}")]
    NotArray(JsonKind),
    /// Item `index` (counting from 0) is the first bad one.
    #[error("item {index}: {problem}")]
    Item {
        /// The position of the item in the array, from 0.
        index: usize,
        /// What is wrong with it.
        problem: ItemProblem,
    },
}

/// What is wrong with one item of a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemProblem {
    /// The item is not a JSON object.
    #[error("must be an object with id and tenant, got {0}")]
    NotObject(JsonKind),
    /// A required field is absent.
    #[error("{0} is missing")]
    Missing(ItemField),
    /// A field is given more than once.
    #[error("{0} is given twice")]
    Duplicate(ItemField),
    /// A field is not a JSON string.
    #[error("{field} must be a string, got {found}")]
    NotString {
        /// The field.
        field: ItemField,
        /// What it was instead.
        found: JsonKind,
    },
    /// A field is the empty string.
    #[error("{0} is empty")]
    Empty(ItemField),
    /// A field is longer than the configured `max_key_bytes` (measured after unescaping).
    #[error("{field} is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: ItemField,
        /// The limit it exceeds.
        max: usize,
    },
}

/// The two fields of an item, for naming them in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemField {
    /// The `id` field.
    Id,
    /// The `tenant` field.
    Tenant,
}

impl fmt::Display for ItemField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ItemField::Id => "id",
            ItemField::Tenant => "tenant",
        })
    }
}

/// The kind of a JSON value found where another was expected, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool,
    /// Any number.
    Number,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonKind::Null => "null",
            JsonKind::Bool => "a boolean",
            JsonKind::Number => "a number",
            JsonKind::String => "a string",
            JsonKind::Array => "an array",
            JsonKind::Object => "an object",
        })
    }
}

/// Records `problem` and aborts the parse; see [`parse_batch`].
fn reject<T, E: de::Error>(failure: &mut Option<BatchError>, problem: BatchError) -> Result<T, E> {
    *failure = Some(problem);
    Err(E::custom("batch rejected"))
}

/// Generates the `visit_*` methods of a visitor for every JSON kind but the ones it handles,
/// each of which rejects the value through `$self.unexpected($kind)`.
macro_rules! reject_other_kinds {
    ($($method:ident($($arg:ty)?) => $kind:expr;)*) => {
        $(
            fn $method<E: de::Error>(self, $(_: $arg)?) -> Result<Self::Value, E> {
                self.unexpected($kind)
            }
        )*
    };
}

/// Parses the top-level array.
struct BatchSeed<'f> {
    max_key_bytes: usize,
    failure: &'f mut Option<BatchError>,
}

impl BatchSeed<'_> {
    fn unexpected<T, E: de::Error>(self, found: JsonKind) -> Result<T, E> {
        reject(self.failure, BatchError::NotArray(found))
    }
}

impl<'de> DeserializeSeed<'de> for BatchSeed<'_> {
    type Value = Vec<Item<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // `deserialize_any` so that every kind of value reaches the visitor and can be named
        // in the error; `deserialize_seq` would fail inside serde_json with a generic message.
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BatchSeed<'_> {
    type Value = Vec<Item<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let seed = ItemSeed { index: items.len(), max_key_bytes: self.max_key_bytes, failure: &mut *self.failure };
            match seq.next_element_seed(seed)? {
                Some(item) => items.push(item),
                None => return Ok(items),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        self.unexpected(JsonKind::Object)
    }

    reject_other_kinds! {
        visit_unit() => JsonKind::Null;
        visit_bool(bool) => JsonKind::Bool;
        visit_i64(i64) => JsonKind::Number;
        visit_u64(u64) => JsonKind::Number;
        visit_f64(f64) => JsonKind::Number;
        visit_str(&str) => JsonKind::String;
    }
}

/// Parses one item of the array.
struct ItemSeed<'f> {
    index: usize,
    max_key_bytes: usize,
    failure: &'f mut Option<BatchError>,
}

impl ItemSeed<'_> {
    fn fail<T, E: de::Error>(self, problem: ItemProblem) -> Result<T, E> {
        reject(self.failure, BatchError::Item { index: self.index, problem })
    }

    fn unexpected<T, E: de::Error>(self, found: JsonKind) -> Result<T, E> {
        self.fail(ItemProblem::NotObject(found))
    }
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_> {
    type Value = Item<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemSeed<'_> {
    type Value = Item<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with id and tenant")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut id = None;
        let mut tenant = None;
        while let Some(key) = map.next_key::<FieldName>()? {
            let (field, slot) = match key {
                FieldName::Id => (ItemField::Id, &mut id),
                FieldName::Tenant => (ItemField::Tenant, &mut tenant),
                FieldName::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return self.fail(ItemProblem::Duplicate(field));
            }
            let value = match map.next_value_seed(KeySeed)? {
                Ok(value) => value,
                Err(found) => return self.fail(ItemProblem::NotString { field, found }),
            };
            if value.is_empty() {
                return self.fail(ItemProblem::Empty(field));
            }
            if value.len() > self.max_key_bytes {
                let max = self.max_key_bytes;
                return self.fail(ItemProblem::TooLong { field, max });
            }
            *slot = Some(value);
        }
        match (id, tenant) {
            (Some(id), Some(tenant)) => Ok(Item { id, tenant }),
            (None, _) => self.fail(ItemProblem::Missing(ItemField::Id)),
            (_, None) => self.fail(ItemProblem::Missing(ItemField::Tenant)),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        self.unexpected(JsonKind::Array)
    }

    reject_other_kinds! {
        visit_unit() => JsonKind::Null;
        visit_bool(bool) => JsonKind::Bool;
        visit_i64(i64) => JsonKind::Number;
        visit_u64(u64) => JsonKind::Number;
        visit_f64(f64) => JsonKind::Number;
        visit_str(&str) => JsonKind::String;
    }
}

/// An object key of an item, told apart without allocating.
enum FieldName {
    Id,
    Tenant,
    Other,
}

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_identifier(FieldNameVisitor)
    }
}

struct FieldNameVisitor;

impl Visitor<'_> for FieldNameVisitor {
    type Value = FieldName;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    // serde_json hands over keys with escapes already resolved, so `"\u0069d"` is `id`.
    fn visit_str<E: de::Error>(self, name: &str) -> Result<FieldName, E> {
        Ok(match name {
            "id" => FieldName::Id,
            "tenant" => FieldName::Tenant,
            _ => FieldName::Other,
        })
    }
}

/// Reads an `id` or `tenant` value: the string, borrowed when it has no escapes, or else the
/// kind of value found instead. The kind is returned rather than raised because only the item
/// knows its index and which field this is.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Result<Cow<'de, str>, JsonKind>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Result<Cow<'de, str>, JsonKind>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Ok(Cow::Borrowed(value)))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Ok(Cow::Owned(value.to_owned())))
    }

    // An array or object must still be read to its end: serde_json checks that it was.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Err(JsonKind::Array))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
        Ok(Err(JsonKind::Object))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err(JsonKind::Null))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(JsonKind::Bool))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(JsonKind::Number))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(JsonKind::Number))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(JsonKind::Number))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 256;

    fn ok(body: &str) -> Vec<Item<'_>> {
        parse_batch(body.as_bytes(), MAX).unwrap_or_else(|err| panic!("{body}: {err}"))
    }

    fn err(body: &str) -> BatchError {
        match parse_batch(body.as_bytes(), MAX) {
            Ok(items) => panic!("{body}: expected an error, got {items:?}"),
            Err(err) => err,
        }
    }

    /// The problem and index of an item error, failing the test on any other error.
    fn item_err(body: &str) -> (usize, ItemProblem) {
        match err(body) {
            BatchError::Item { index, problem } => (index, problem),
            other => panic!("{body}: expected an item error, got {other:?}"),
        }
    }

    #[test]
    fn parses_items_borrowing_plain_strings() {
        let items = ok(r#"[{"id":"1","tenant":"t1"}, {"tenant":"t2","id":"2"}]"#);
        assert_eq!(items, [Item::new("t1", "1"), Item::new("t2", "2")]);
        assert!(items.iter().all(|item| matches!((&item.id, &item.tenant), (Cow::Borrowed(_), Cow::Borrowed(_)))));
    }

    #[test]
    fn unescapes_strings_and_keys() {
        let items = ok(r#"[{"\u0069d":"a\"b","tenant":"caf\u00e9 \ud83d\ude00"}]"#);
        assert_eq!(items, [Item::new("café 😀", "a\"b")]);
        assert!(matches!(items[0].id, Cow::Owned(_)));
    }

    #[test]
    fn empty_array_is_an_empty_batch() {
        assert!(ok("[]").is_empty());
        assert!(ok(" \n[ ]\n ").is_empty());
    }

    #[test]
    fn extra_fields_are_ignored() {
        let items = ok(r#"[{"id":"1","extra":{"deep":[1,2,{"x":null}]},"tenant":"t","n":5,"extra":1}]"#);
        assert_eq!(items, [Item::new("t", "1")]);
    }

    #[test]
    fn malformed_json() {
        for body in [
            "",
            "[",
            "[{",
            r#"[{"id":"1","tenant":"t"}"#,
            r#"[{"id":"1" "tenant":"t"}]"#,
            r#"[{"id":"1","tenant":"t"},]"#,
            "nope",
        ] {
            assert!(matches!(err(body), BatchError::Malformed(_)), "{body:?}");
        }
        assert!(matches!(parse_batch(b"[{\"id\":\"\xff\",\"tenant\":\"t\"}]", MAX), Err(BatchError::Malformed(_))));
        assert!(err("nope").to_string().starts_with("malformed JSON: "));
    }

    #[test]
    fn trailing_garbage_is_malformed() {
        for body in ["[] x", "[][]", r#"[{"id":"1","tenant":"t"}]}"#, "[] 1"] {
            assert!(matches!(err(body), BatchError::Malformed(_)), "{body:?}");
        }
    }

    #[test]
    fn body_must_be_an_array() {
        let cases = [
            (r#"{"id":"1","tenant":"t"}"#, JsonKind::Object),
            ("null", JsonKind::Null),
            ("true", JsonKind::Bool),
            ("-3", JsonKind::Number),
            ("2.5", JsonKind::Number),
            (r#""items""#, JsonKind::String),
        ];
        for (body, kind) in cases {
            assert!(matches!(err(body), BatchError::NotArray(found) if found == kind), "{body}");
        }
        assert_eq!(err("{}").to_string(), "the body must be a JSON array of items, got an object");
    }

    #[test]
    fn item_must_be_an_object() {
        let good = r#"{"id":"1","tenant":"t"}"#;
        for (item, kind) in
            [("[]", JsonKind::Array), ("\"x\"", JsonKind::String), ("7", JsonKind::Number), ("null", JsonKind::Null)]
        {
            let body = format!("[{good},{good},{item}]");
            assert_eq!(item_err(&body), (2, ItemProblem::NotObject(kind)), "{body}");
        }
        assert_eq!(err("[1]").to_string(), "item 0: must be an object with id and tenant, got a number");
    }

    #[test]
    fn fields_are_required() {
        assert_eq!(item_err(r#"[{"tenant":"t"}]"#), (0, ItemProblem::Missing(ItemField::Id)));
        assert_eq!(item_err(r#"[{"id":"1","tenant":"t"},{"id":"1"}]"#), (1, ItemProblem::Missing(ItemField::Tenant)));
        assert_eq!(item_err(r#"[{}]"#), (0, ItemProblem::Missing(ItemField::Id)));
        assert_eq!(err(r#"[{"id":"1"}]"#).to_string(), "item 0: tenant is missing");
    }

    #[test]
    fn fields_must_be_strings() {
        let cases = [
            (r#"{"id":1,"tenant":"t"}"#, ItemField::Id, JsonKind::Number),
            (r#"{"id":"1","tenant":null}"#, ItemField::Tenant, JsonKind::Null),
            (r#"{"id":"1","tenant":false}"#, ItemField::Tenant, JsonKind::Bool),
            (r#"{"id":["1"],"tenant":"t"}"#, ItemField::Id, JsonKind::Array),
            (r#"{"id":"1","tenant":{"name":"t"}}"#, ItemField::Tenant, JsonKind::Object),
        ];
        for (item, field, found) in cases {
            let body = format!("[{item}]");
            assert_eq!(item_err(&body), (0, ItemProblem::NotString { field, found }), "{body}");
        }
        assert_eq!(err(r#"[{"id":1.5,"tenant":"t"}]"#).to_string(), "item 0: id must be a string, got a number");
    }

    #[test]
    fn fields_must_not_be_empty() {
        assert_eq!(item_err(r#"[{"id":"","tenant":"t"}]"#), (0, ItemProblem::Empty(ItemField::Id)));
        assert_eq!(item_err(r#"[{"id":"1","tenant":""}]"#), (0, ItemProblem::Empty(ItemField::Tenant)));
    }

    #[test]
    fn fields_are_bounded_in_bytes() {
        let at_limit = "é".repeat(MAX / 2);
        let items = ok(&format!(r#"[{{"id":"{at_limit}","tenant":"t"}}]"#)).len();
        assert_eq!(items, 1);
        let good = r#"{"id":"1","tenant":"t"}"#;
        // 129 two-byte characters: 129 chars is under the limit, 258 bytes is over it.
        let over = "é".repeat(MAX / 2 + 1);
        let body = format!(r#"[{good},{good},{good},{{"id":"1","tenant":"{over}"}}]"#);
        assert_eq!(item_err(&body), (3, ItemProblem::TooLong { field: ItemField::Tenant, max: MAX }));
        assert_eq!(err(&body).to_string(), "item 3: tenant is longer than 256 bytes");
        // The limit applies to the unescaped string.
        let escaped = r"\u0041".repeat(MAX);
        assert_eq!(ok(&format!(r#"[{{"id":"{escaped}","tenant":"t"}}]"#))[0].id.len(), MAX);
    }

    #[test]
    fn duplicate_fields_are_rejected() {
        assert_eq!(item_err(r#"[{"id":"1","id":"2","tenant":"t"}]"#), (0, ItemProblem::Duplicate(ItemField::Id)));
        assert_eq!(
            item_err(r#"[{"id":"1","tenant":"t","\u0074enant":"t"}]"#),
            (0, ItemProblem::Duplicate(ItemField::Tenant))
        );
    }

    #[test]
    fn the_first_bad_item_is_reported() {
        let body = r#"[{"id":"1","tenant":"t"},{"id":"","tenant":"t"},{"tenant":"t"},5]"#;
        assert_eq!(item_err(body), (1, ItemProblem::Empty(ItemField::Id)));
    }

    #[test]
    fn a_bad_value_in_an_ignored_field_is_still_malformed() {
        assert!(matches!(err(r#"[{"id":"1","tenant":"t","x":[1,}]"#), BatchError::Malformed(_)));
    }
}
