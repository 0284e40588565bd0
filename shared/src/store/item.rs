//! DynamoDB items as the store writes and reads them: attribute helpers,
//! used by every item kind (results, chords, cache entries), and the one
//! rule for an item's size (the service's bound and the benchmark's bill).

use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;

use super::schema::attr;

/// An item's attributes.
pub type Item = HashMap<String, AttributeValue>;

/// DynamoDB's item size limit (400 KB, counted as names plus values).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;

/// A string attribute.
pub fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number attribute.
pub fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The primary key of an item.
pub fn key(pk: impl Into<String>, sk: &str) -> Item {
    HashMap::from([(attr::PK.to_owned(), s(pk)), (attr::SK.to_owned(), s(sk))])
}

/// A string attribute's value, if the item has one of that name.
pub fn get_s(item: &Item, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    }
}

/// A number attribute's value, if the item has one of that name that reads
/// as a whole number.
pub fn get_n(item: &Item, name: &str) -> Option<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

/// An item's size as DynamoDB counts it (the 400 KB limit and the billed
/// units): each attribute's name plus its value. Strings and binaries by
/// their length; numbers about one byte per two digits, plus one; booleans
/// and nulls one; a list or map 3 bytes plus one per element plus its
/// elements (a map's names too); a set the sum of its members.
pub fn item_size(item: &Item) -> usize {
    item.iter().map(|(name, value)| name.len() + value_size(value)).sum()
}

fn number_size(digits: &str) -> usize {
    digits.len().div_ceil(2) + 1
}

fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number_size(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::M(m) => 3 + m.iter().map(|(k, v)| k.len() + value_size(v) + 1).sum::<usize>(),
        AttributeValue::L(l) => 3 + l.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        AttributeValue::Ss(ss) => ss.iter().map(String::len).sum(),
        AttributeValue::Ns(ns) => ns.iter().map(|n| number_size(n)).sum(),
        AttributeValue::Bs(bs) => bs.iter().map(|b| b.as_ref().len()).sum(),
        // A kind this SDK does not know: counted high rather than low.
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_dynamodbs_rules() {
        let item = HashMap::from([
            ("pk".to_owned(), s("default#task#t1")),
            ("n".to_owned(), n(12345)),
            ("ok".to_owned(), AttributeValue::Bool(true)),
        ]);
        // Names plus values: 2 + 15, 1 + (5 digits: 3 + 1), 2 + 1.
        assert_eq!(item_size(&item), 17 + 5 + 3);
        let nested = HashMap::from([
            ("w".to_owned(), AttributeValue::L(vec![s("ab"), s("c")])),
            ("m".to_owned(), AttributeValue::M(HashMap::from([("k".to_owned(), n(7))]))),
            ("ids".to_owned(), AttributeValue::Ss(vec!["x".into(), "yz".into()])),
        ]);
        // w: 1 + 3 + (2 + 1) + (1 + 1); m: 1 + 3 + (1 + 2 + 1); ids: 3 + 3.
        assert_eq!(item_size(&nested), 9 + 8 + 6);
    }
}
