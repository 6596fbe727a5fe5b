//! The classification catalog: item code + observed condition → AS 1851 defect class.
//!
//! The catalog is data, not code: a versioned JSON file (the sample ships as
//! `config/catalog.json`; operators may replace it). This crate parses and validates that
//! file and builds [`CatalogIndex`], the in-memory lookup the classify worker answers from.
//!
//! Architecture invariant: no I/O. Loading the file and storing it are the caller's job.
//!
//! The index keeps each answer already rendered as JSON bytes, so a lookup on the hot path
//! is one hash probe, a short scan of the item's conditions and a reference-count bump.

#![forbid(unsafe_code)]

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// The sample catalog shipped with FireMode.
pub const SAMPLE: &str = include_str!("../../../config/catalog.json");

/// Clause 1.5.6 defect classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// Renders a system inoperative.
    CriticalDefect,
    /// Impairs a component without critically affecting the system.
    NonCriticalDefect,
    /// Missing or wrong information: signs, labels, block plans, records.
    NonConformance,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub observed_condition: String,
    pub classification: Classification,
    pub description: String,
    pub action: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub item_code: String,
    /// Other codes clients may send for this item (for example the original clients'
    /// `AS1851-2012-FE-01`); a classify answer echoes the code the client sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub family: String,
    pub description: String,
    pub conditions: Vec<Condition>,
}

/// The catalog file, and the `catalog` member of an offline bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub version: String,
    pub items: Vec<Item>,
}

/// Why a catalog file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog is not valid JSON of the catalog shape: {0}")]
    Parse(serde_json::Error),
    #[error("catalog is invalid: {0}")]
    Invalid(InvalidCatalog),
}

/// A catalog that parses but breaks a rule; each message names the item or code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCatalog {
    #[error("`version` must be 1-128 characters")]
    Version,
    #[error("`items` is empty")]
    NoItems,
    #[error("item_code {0:?} must be 1-64 characters")]
    CodeLength(String),
    #[error("item_code {0:?} appears twice (as a code or an alias)")]
    DuplicateCode(String),
    #[error("item {0:?} has no conditions")]
    NoConditions(String),
    #[error("item {0:?} has an empty observed_condition")]
    EmptyCondition(String),
    #[error("item {item:?} lists condition {condition:?} twice")]
    DuplicateCondition { item: String, condition: String },
}

impl Catalog {
    /// Parses and validates a catalog file's text.
    pub fn from_json(text: &str) -> Result<Catalog, CatalogError> {
        let catalog: Catalog = serde_json::from_str(text).map_err(CatalogError::Parse)?;
        catalog.validate().map_err(CatalogError::Invalid)?;
        Ok(catalog)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), InvalidCatalog> {
        if self.version.trim().is_empty() || self.version.len() > 128 {
            return Err(InvalidCatalog::Version);
        }
        if self.items.is_empty() {
            return Err(InvalidCatalog::NoItems);
        }
        let mut codes = HashSet::new();
        for item in &self.items {
            for code in item.codes() {
                if code.is_empty() || code.len() > 64 {
                    return Err(InvalidCatalog::CodeLength(code.to_owned()));
                }
                if !codes.insert(code) {
                    return Err(InvalidCatalog::DuplicateCode(code.to_owned()));
                }
            }
            item.validate_conditions()?;
        }
        Ok(())
    }
}

impl Item {
    /// The item's code, then its aliases.
    pub fn codes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.item_code.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// At least one condition, each named, none twice.
    fn validate_conditions(&self) -> Result<(), InvalidCatalog> {
        if self.conditions.is_empty() {
            return Err(InvalidCatalog::NoConditions(self.item_code.clone()));
        }
        let mut seen = HashSet::new();
        for c in &self.conditions {
            if c.observed_condition.is_empty() {
                return Err(InvalidCatalog::EmptyCondition(self.item_code.clone()));
            }
            if !seen.insert(c.observed_condition.as_str()) {
                return Err(InvalidCatalog::DuplicateCondition {
                    item: self.item_code.clone(),
                    condition: c.observed_condition.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Why a lookup found no rule.
#[derive(Debug, PartialEq)]
pub enum Miss<'a> {
    UnknownItem,
    /// The item exists; these are the conditions it knows.
    UnknownCondition {
        allowed: Vec<&'a str>,
    },
}

struct IndexedItem {
    /// (observed_condition, rendered classify answer)
    conditions: Vec<(String, Bytes)>,
}

/// The lookup built from one catalog version.
pub struct CatalogIndex {
    catalog: Catalog,
    items: HashMap<String, IndexedItem>,
}

#[derive(Serialize)]
struct Answer<'a> {
    item_code: &'a str,
    observed_condition: &'a str,
    classification: Classification,
    description: &'a str,
    action: &'a str,
    catalog_version: &'a str,
}

impl CatalogIndex {
    pub fn new(catalog: Catalog) -> Self {
        let items = catalog
            .items
            .iter()
            .flat_map(|item| item.codes().map(move |code| (code, item)))
            .map(|(code, item)| {
                let conditions = item
                    .conditions
                    .iter()
                    .map(|c| {
                        let answer = Answer {
                            item_code: code,
                            observed_condition: &c.observed_condition,
                            classification: c.classification,
                            description: &c.description,
                            action: &c.action,
                            catalog_version: &catalog.version,
                        };
                        let body = serde_json::to_vec(&answer).unwrap_or_default();
                        (c.observed_condition.clone(), Bytes::from(body))
                    })
                    .collect();
                (code.to_owned(), IndexedItem { conditions })
            })
            .collect();
        Self { catalog, items }
    }

    pub fn version(&self) -> &str {
        &self.catalog.version
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The classify answer for an item and condition, as the JSON body of a 200.
    pub fn classify(&self, item_code: &str, condition: &str) -> Result<Bytes, Miss<'_>> {
        let item = self.items.get(item_code).ok_or(Miss::UnknownItem)?;
        item.conditions
            .iter()
            .find(|(c, _)| c == condition)
            .map(|(_, body)| body.clone())
            .ok_or_else(|| Miss::UnknownCondition {
                allowed: item.conditions.iter().map(|(c, _)| c.as_str()).collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_catalog_is_valid_and_large_enough() {
        let c = Catalog::from_json(SAMPLE).unwrap();
        let families: HashSet<_> = c.items.iter().map(|i| i.family.as_str()).collect();
        let rules: usize = c.items.iter().map(|i| i.conditions.len()).sum();
        assert!(families.len() >= 8, "{families:?}");
        assert!(rules >= 60, "{rules}");
        for class in [
            Classification::CriticalDefect,
            Classification::NonCriticalDefect,
            Classification::NonConformance,
        ] {
            assert!(c
                .items
                .iter()
                .flat_map(|i| &i.conditions)
                .any(|r| r.classification == class));
        }
    }

    fn tiny() -> Catalog {
        Catalog::from_json(
            r#"{"version":"t1","items":[{"item_code":"FE","family":"ext","description":"d",
            "conditions":[{"observed_condition":"low","classification":"critical_defect",
            "description":"gauge low","action":"replace"},
            {"observed_condition":"tag_missing","classification":"non_conformance",
            "description":"no tag","action":"tag it"}]}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn lookup_answers_hits_and_explains_misses() {
        let idx = CatalogIndex::new(tiny());
        let body: serde_json::Value =
            serde_json::from_slice(&idx.classify("FE", "low").unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"item_code":"FE","observed_condition":"low",
                "classification":"critical_defect","description":"gauge low",
                "action":"replace","catalog_version":"t1"})
        );
        assert_eq!(idx.classify("XX", "low"), Err(Miss::UnknownItem));
        assert_eq!(
            idx.classify("FE", "wet"),
            Err(Miss::UnknownCondition {
                allowed: vec!["low", "tag_missing"]
            })
        );
    }

    #[test]
    fn aliases_answer_like_their_item_and_echo_the_code_sent() {
        let mut catalog = tiny();
        catalog.items[0].aliases = vec!["AS1851-2012-FE-01".into()];
        let idx = CatalogIndex::new(catalog.clone());
        let body: serde_json::Value =
            serde_json::from_slice(&idx.classify("AS1851-2012-FE-01", "low").unwrap()).unwrap();
        assert_eq!(body["item_code"], "AS1851-2012-FE-01");
        assert_eq!(body["classification"], "critical_defect");
        assert!(idx.classify("FE", "low").is_ok());
        // An alias that repeats a code is refused.
        catalog.items[0].aliases = vec!["FE".into()];
        let text = serde_json::to_string(&catalog).unwrap();
        assert!(
            matches!(Catalog::from_json(&text), Err(CatalogError::Invalid(m)) if m.to_string().contains("twice"))
        );
    }

    #[test]
    fn the_original_clients_codes_classify() {
        let idx = CatalogIndex::new(Catalog::from_json(SAMPLE).unwrap());
        let body: serde_json::Value =
            serde_json::from_slice(&idx.classify("AS1851-2012-FE-01", "pressure_low").unwrap())
                .unwrap();
        assert_eq!(body["classification"], "critical_defect");
    }

    #[test]
    fn invalid_catalogs_are_refused_with_a_reason() {
        let dup = r#"{"version":"v","items":[
            {"item_code":"A","family":"f","description":"d","conditions":[{"observed_condition":"x","classification":"non_conformance","description":"d","action":"a"}]},
            {"item_code":"A","family":"f","description":"d","conditions":[{"observed_condition":"x","classification":"non_conformance","description":"d","action":"a"}]}]}"#;
        assert!(
            matches!(Catalog::from_json(dup), Err(CatalogError::Invalid(m)) if m.to_string().contains("twice"))
        );
        assert!(matches!(
            Catalog::from_json(r#"{"version":"v","items":[{"item_code":"A"}]}"#),
            Err(CatalogError::Parse(_))
        ));
        assert!(matches!(
            Catalog::from_json(
                r#"{"version":"v","items":[{"item_code":"A","family":"f","description":"d","conditions":[{"observed_condition":"x","classification":"broken","description":"d","action":"a"}]}]}"#
            ),
            Err(CatalogError::Parse(_))
        ));
    }

    #[test]
    fn refusals_name_the_item_or_code() {
        let refusal = |catalog: &Catalog| {
            let text = serde_json::to_string(catalog).unwrap();
            Catalog::from_json(&text).unwrap_err().to_string()
        };
        let mut c = tiny();
        c.version = String::new();
        assert_eq!(
            refusal(&c),
            "catalog is invalid: `version` must be 1-128 characters"
        );
        let mut c = tiny();
        c.items.clear();
        assert_eq!(refusal(&c), "catalog is invalid: `items` is empty");
        let mut c = tiny();
        c.items[0].aliases = vec!["x".repeat(65)];
        assert!(refusal(&c).ends_with("\" must be 1-64 characters"));
        let mut c = tiny();
        c.items[0].conditions.clear();
        assert_eq!(
            refusal(&c),
            "catalog is invalid: item \"FE\" has no conditions"
        );
        let mut c = tiny();
        c.items[0].conditions[1].observed_condition = String::new();
        assert_eq!(
            refusal(&c),
            "catalog is invalid: item \"FE\" has an empty observed_condition"
        );
        let mut c = tiny();
        c.items[0].conditions[1].observed_condition = "low".into();
        assert_eq!(
            refusal(&c),
            "catalog is invalid: item \"FE\" lists condition \"low\" twice"
        );
        assert!(Catalog::from_json("{")
            .unwrap_err()
            .to_string()
            .starts_with("catalog is not valid JSON of the catalog shape: EOF"));
    }
}
