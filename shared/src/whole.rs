//! Whole numbers in request bodies as JSON Schema counts them: `3` and `3.0`
//! are the same integer (openapi.yaml's `type: integer` allows both), so a
//! request field that takes an integer takes an integral float too; `3.5`,
//! a negative or one past the field's type is refused as before.
//!
//! Use with `#[serde(deserialize_with = "crate::whole::required")]`, or
//! `#[serde(default, deserialize_with = "crate::whole::optional")]`.

use serde::de::Error;
use serde::{Deserialize, Deserializer};

/// The largest float that is exactly a whole number (2^53).
const EXACT: f64 = 9_007_199_254_740_992.0;

fn from_number<E: Error, T: TryFrom<u64>>(n: &serde_json::Number) -> Result<T, E> {
    let whole = n.as_u64().or_else(|| {
        let f = n.as_f64()?;
        (f.fract() == 0.0 && (0.0..=EXACT).contains(&f)).then_some(f as u64)
    });
    let whole = whole.ok_or_else(|| E::custom(format!("invalid value: {n}, expected a whole number of at least 0")))?;
    T::try_from(whole).map_err(|_| E::custom(format!("invalid value: {n} is too large")))
}

/// A JSON value as a whole number, if it is one (an integer or an
/// integral float, at least 0).
pub fn as_u64(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(n) => from_number::<serde_json::Error, u64>(n).ok(),
        _ => None,
    }
}

/// A whole number (a JSON integer or integral float).
pub fn required<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    from_number(&serde_json::Number::deserialize(d)?)
}

/// A whole number or `null`.
pub fn optional<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?.map(|n| from_number(&n)).transpose()
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct Fields {
        #[serde(deserialize_with = "super::required")]
        size: u32,
        #[serde(default, deserialize_with = "super::optional")]
        ttl: Option<u64>,
    }

    fn parse(json: &str) -> Result<Fields, String> {
        serde_json::from_str::<Fields>(json).map_err(|e| e.to_string())
    }

    #[test]
    fn an_integral_float_is_the_integer_and_anything_else_is_refused() {
        let f = parse(r#"{"size": 529.0, "ttl": 1.0}"#).unwrap();
        assert_eq!((f.size, f.ttl), (529, Some(1)));
        let f = parse(r#"{"size": 3}"#).unwrap();
        assert_eq!((f.size, f.ttl), (3, None));
        assert_eq!(parse(r#"{"size": 3, "ttl": null}"#).unwrap().ttl, None);
        for bad in [
            r#"{"size": 3.5}"#,
            r#"{"size": -1}"#,
            r#"{"size": -1.0}"#,
            r#"{"size": 4294967296}"#,
            r#"{"size": "3"}"#,
            r#"{"size": 1e300}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }
}
