//! The analyzer registry: the analyzers the distributor delivers to, with their weights and
//! settings. The config file gives the initial set; the admin API (`admin`) changes it at runtime,
//! and every change is stored in the WAL's sled database (one key, flushed before the change is
//! answered) so that it survives a restart. At start the stored set wins over the config file, unless
//! the distributor is started with `--reset-analyzers`.
//!
//! This module holds the set and its rules (what a valid set is, what each admin operation does);
//! it does no I/O besides [`load`] and [`store`]. Every refusal is a [`RegistryError`] that says
//! what is wrong, mapped by `admin` to a 4xx.

use std::collections::HashSet;
use std::fmt;

use logdist_config::{check_analyzer, AnalyzerEntry, MAX_ANALYZERS};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::wal::{Wal, WalError};

/// One registered analyzer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyzerSpec {
    pub id: String,
    pub endpoint: String,
    pub weight: f64,
    pub timeout_ms: u64,
    pub retry_count: u32,
    /// False after `POST /admin/analyzers/{id}/disable`: no traffic until it is enabled again.
    pub enabled: bool,
}

impl From<&AnalyzerEntry> for AnalyzerSpec {
    fn from(a: &AnalyzerEntry) -> Self {
        Self {
            id: a.id.clone(),
            endpoint: a.endpoint.clone(),
            weight: a.weight,
            timeout_ms: a.timeout_ms,
            retry_count: a.retry_count,
            enabled: true,
        }
    }
}

impl AnalyzerSpec {
    fn entry(&self) -> AnalyzerEntry {
        AnalyzerEntry {
            id: self.id.clone(),
            endpoint: self.endpoint.clone(),
            weight: self.weight,
            timeout_ms: self.timeout_ms,
            retry_count: self.retry_count,
        }
    }
}

/// The fields of `PUT /admin/analyzers/{id}` and `POST /admin/analyzers`; those left out keep
/// their value (or take the default, for a new analyzer).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzerPatch {
    pub id: Option<String>,
    pub endpoint: Option<String>,
    pub weight: Option<f64>,
    pub timeout_ms: Option<u64>,
    pub retry_count: Option<u32>,
    pub enabled: Option<bool>,
}

/// Weight of an analyzer registered without one.
pub const DEFAULT_WEIGHT: f64 = 1.0;

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("no analyzer with id {0:?}")]
    UnknownId(String),
    #[error("an analyzer with id {0:?} is already registered")]
    DuplicateId(String),
    #[error("`{field}` {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(
        "no enabled analyzer would have a positive weight; at least one must, or nothing can be delivered"
    )]
    NoPositiveWeight,
    #[error("at most {MAX_ANALYZERS} analyzers can be registered")]
    TooMany,
}

/// The registered analyzers, in registration order.
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    analyzers: Vec<AnalyzerSpec>,
}

impl Registry {
    /// A registry from a list, checked like any change.
    pub fn new(analyzers: Vec<AnalyzerSpec>) -> Result<Self, RegistryError> {
        let r = Self { analyzers };
        r.validate()?;
        Ok(r)
    }

    pub fn from_config(entries: &[AnalyzerEntry]) -> Result<Self, RegistryError> {
        Self::new(entries.iter().map(AnalyzerSpec::from).collect())
    }

    pub fn analyzers(&self) -> &[AnalyzerSpec] {
        &self.analyzers
    }

    pub fn get(&self, id: &str) -> Option<&AnalyzerSpec> {
        self.analyzers.iter().find(|a| a.id == id)
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut AnalyzerSpec, RegistryError> {
        self.analyzers
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or_else(|| RegistryError::UnknownId(id.to_string()))
    }

    /// Register `id`, or update the fields `patch` sets. Returns true if it was created.
    pub fn upsert(&mut self, id: &str, patch: AnalyzerPatch) -> Result<bool, RegistryError> {
        if let Some(body_id) = &patch.id {
            if body_id != id {
                return Err(RegistryError::Invalid {
                    field: "id",
                    message: format!("{body_id:?} in the body differs from {id:?} in the path"),
                });
            }
        }
        let mut next = self.clone();
        let created = match next.analyzers.iter_mut().find(|a| a.id == id) {
            Some(a) => {
                apply(a, patch);
                false
            }
            None => {
                let spec = new_spec(id, patch)?;
                next.analyzers.push(spec);
                true
            }
        };
        next.validate()?;
        *self = next;
        Ok(created)
    }

    /// Register a new analyzer; an id already registered is refused.
    pub fn create(&mut self, patch: AnalyzerPatch) -> Result<(), RegistryError> {
        let id = patch.id.clone().ok_or(RegistryError::Invalid {
            field: "id",
            message: "is required".into(),
        })?;
        if self.get(&id).is_some() {
            return Err(RegistryError::DuplicateId(id));
        }
        self.upsert(&id, patch).map(|_| ())
    }

    pub fn remove(&mut self, id: &str) -> Result<AnalyzerSpec, RegistryError> {
        let i = self
            .analyzers
            .iter()
            .position(|a| a.id == id)
            .ok_or_else(|| RegistryError::UnknownId(id.to_string()))?;
        let mut next = self.clone();
        let removed = next.analyzers.remove(i);
        next.validate()?;
        *self = next;
        Ok(removed)
    }

    /// Set the weights of the analyzers listed; the others keep theirs. All or nothing.
    pub fn set_weights(&mut self, weights: &WeightMap) -> Result<(), RegistryError> {
        let mut next = self.clone();
        let mut seen = HashSet::new();
        for (id, w) in &weights.0 {
            if !seen.insert(id.as_str()) {
                return Err(RegistryError::Invalid {
                    field: "weights",
                    message: format!("name {id:?} more than once"),
                });
            }
            next.get_mut(id)?.weight = *w;
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> Result<(), RegistryError> {
        let mut next = self.clone();
        next.get_mut(id)?.enabled = enabled;
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn validate(&self) -> Result<(), RegistryError> {
        if self.analyzers.len() > MAX_ANALYZERS {
            return Err(RegistryError::TooMany);
        }
        let mut ids = HashSet::new();
        for a in &self.analyzers {
            check_analyzer(&a.entry())
                .map_err(|(field, message)| RegistryError::Invalid { field, message })?;
            if !ids.insert(a.id.as_str()) {
                return Err(RegistryError::DuplicateId(a.id.clone()));
            }
        }
        if !self.analyzers.iter().any(|a| a.enabled && a.weight > 0.0) {
            return Err(RegistryError::NoPositiveWeight);
        }
        Ok(())
    }
}

fn apply(a: &mut AnalyzerSpec, patch: AnalyzerPatch) {
    let AnalyzerPatch {
        id: _,
        endpoint,
        weight,
        timeout_ms,
        retry_count,
        enabled,
    } = patch;
    if let Some(v) = endpoint {
        a.endpoint = v;
    }
    if let Some(v) = weight {
        a.weight = v;
    }
    if let Some(v) = timeout_ms {
        a.timeout_ms = v;
    }
    if let Some(v) = retry_count {
        a.retry_count = v;
    }
    if let Some(v) = enabled {
        a.enabled = v;
    }
}

fn new_spec(id: &str, patch: AnalyzerPatch) -> Result<AnalyzerSpec, RegistryError> {
    let endpoint = patch.endpoint.clone().ok_or(RegistryError::Invalid {
        field: "endpoint",
        message: "is required to register a new analyzer".into(),
    })?;
    let mut spec = AnalyzerSpec {
        id: id.to_string(),
        endpoint,
        weight: DEFAULT_WEIGHT,
        timeout_ms: logdist_config::default_timeout_ms(),
        retry_count: logdist_config::default_retry_count(),
        enabled: true,
    };
    apply(&mut spec, patch);
    Ok(spec)
}

/// The body of `PUT /admin/weights`: `{"analyzer-1": 0.6, ...}`, kept in order and with any
/// repeated name (which a plain map would silently collapse), so that a repeat can be refused.
#[derive(Debug, Clone, Default)]
pub struct WeightMap(pub Vec<(String, f64)>);

impl<'de> Deserialize<'de> for WeightMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WeightMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"an object of analyzer ids to weights, e.g. {"analyzer-1": 0.6}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WeightMap, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    out.push(entry);
                }
                Ok(WeightMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    analyzers: Vec<AnalyzerSpec>,
}

const STORED_VERSION: u32 = 1;

/// Where the registry in use at start came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The config file (nothing stored yet, or `--reset-analyzers`).
    Config,
    /// Changed at runtime and stored in the WAL's directory.
    Stored,
}

/// The registry to start with: the stored one, unless there is none or `reset` is set.
pub fn load(
    wal: &Wal,
    config: &[AnalyzerEntry],
    reset: bool,
) -> anyhow::Result<(Registry, Source)> {
    use anyhow::Context;
    let from_config = || Registry::from_config(config).context("the config file's analyzers");
    if reset {
        return Ok((from_config()?, Source::Config));
    }
    let Some(bytes) = wal.load_registry()? else {
        return Ok((from_config()?, Source::Config));
    };
    let stored: Stored = serde_json::from_slice(&bytes)
        .context("the analyzer registry stored in the WAL cannot be read; start with --reset-analyzers to take the config file's")?;
    anyhow::ensure!(
        stored.version == STORED_VERSION,
        "the stored analyzer registry has version {}, this build reads {STORED_VERSION}",
        stored.version
    );
    let registry = Registry::new(stored.analyzers)
        .context("the analyzer registry stored in the WAL is not valid")?;
    Ok((registry, Source::Stored))
}

/// Store the registry and flush it (blocking: call from a blocking thread).
pub fn store(wal: &Wal, registry: &Registry) -> Result<(), WalError> {
    let stored = Stored {
        version: STORED_VERSION,
        analyzers: registry.analyzers.clone(),
    };
    let bytes = serde_json::to_vec(&stored).expect("a registry always serialises");
    wal.store_registry(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, weight: f64) -> AnalyzerSpec {
        AnalyzerSpec {
            id: id.into(),
            endpoint: format!("http://127.0.0.1:1/{id}"),
            weight,
            timeout_ms: 1000,
            retry_count: 1,
            enabled: true,
        }
    }

    type Change = Box<dyn Fn(&mut Registry) -> Result<(), RegistryError>>;

    fn three() -> Registry {
        Registry::new(vec![spec("a", 0.5), spec("b", 0.3), spec("c", 0.2)]).unwrap()
    }

    fn weights(pairs: &[(&str, f64)]) -> WeightMap {
        WeightMap(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn weights_change_for_the_named_analyzers_only() {
        let mut r = three();
        r.set_weights(&weights(&[("a", 0.6), ("c", 0.0)])).unwrap();
        let got: Vec<f64> = r.analyzers().iter().map(|a| a.weight).collect();
        assert_eq!(got, vec![0.6, 0.3, 0.0]);
    }

    #[test]
    fn bad_changes_are_refused_and_leave_the_registry_as_it_was() {
        let r = three();
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|r| r.set_weights(&weights(&[("x", 1.0)]))),
                "no analyzer with id \"x\"",
            ),
            (
                Box::new(|r| r.set_weights(&weights(&[("a", -1.0)]))),
                "`weight`",
            ),
            (
                Box::new(|r| r.set_weights(&weights(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]))),
                "positive weight",
            ),
            (
                Box::new(|r| r.set_weights(&weights(&[("a", 1.0), ("a", 2.0)]))),
                "more than once",
            ),
            (
                Box::new(|r| {
                    r.create(AnalyzerPatch {
                        id: Some("b".into()),
                        endpoint: Some("http://x:1".into()),
                        ..Default::default()
                    })
                }),
                "already registered",
            ),
            (
                Box::new(|r| r.upsert("d", AnalyzerPatch::default()).map(|_| ())),
                "`endpoint` is required",
            ),
            (
                Box::new(|r| {
                    r.upsert(
                        "d",
                        AnalyzerPatch {
                            endpoint: Some("ftp://x".into()),
                            ..Default::default()
                        },
                    )
                    .map(|_| ())
                }),
                "`endpoint`",
            ),
            (
                Box::new(|r| {
                    r.upsert(
                        "a",
                        AnalyzerPatch {
                            id: Some("b".into()),
                            ..Default::default()
                        },
                    )
                    .map(|_| ())
                }),
                "differs",
            ),
            (Box::new(|r| r.remove("nope").map(|_| ())), "no analyzer"),
            (Box::new(|r| r.set_enabled("nope", false)), "no analyzer"),
            (
                Box::new(|r| {
                    r.upsert(
                        "a",
                        AnalyzerPatch {
                            retry_count: Some(1000),
                            ..Default::default()
                        },
                    )
                    .map(|_| ())
                }),
                "`retry_count`",
            ),
            (
                Box::new(|r| {
                    r.upsert(
                        "a b",
                        AnalyzerPatch {
                            endpoint: Some("http://x:1".into()),
                            ..Default::default()
                        },
                    )
                    .map(|_| ())
                }),
                "`id`",
            ),
        ];
        for (change, needle) in cases {
            let mut copy = r.clone();
            let err = change(&mut copy).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} (wanted {needle})");
            assert_eq!(copy, r, "a refused change leaves it as it was ({needle})");
        }
    }

    #[test]
    fn removing_the_last_weighted_analyzer_is_refused() {
        let mut r = Registry::new(vec![spec("a", 1.0), spec("b", 0.0)]).unwrap();
        assert_eq!(r.remove("a"), Err(RegistryError::NoPositiveWeight));
        assert_eq!(
            r.set_enabled("a", false),
            Err(RegistryError::NoPositiveWeight),
            "switching off the last one is refused too"
        );
        r.remove("b").unwrap();
        assert_eq!(r.analyzers().len(), 1);
    }

    #[test]
    fn upsert_creates_with_defaults_and_updates_only_what_it_names() {
        let mut r = three();
        let created = r
            .upsert(
                "d",
                AnalyzerPatch {
                    endpoint: Some("http://127.0.0.1:9/".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(created);
        let d = r.get("d").unwrap();
        assert_eq!((d.weight, d.enabled), (DEFAULT_WEIGHT, true));
        let created = r
            .upsert(
                "a",
                AnalyzerPatch {
                    retry_count: Some(7),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(!created);
        let a = r.get("a").unwrap();
        assert_eq!((a.weight, a.retry_count), (0.5, 7));
    }

    #[test]
    fn a_weight_map_keeps_repeated_names_so_they_can_be_refused() {
        let m: WeightMap = serde_json::from_str(r#"{"a": 1, "a": 2.5}"#).unwrap();
        assert_eq!(m.0, vec![("a".to_string(), 1.0), ("a".to_string(), 2.5)]);
        assert!(serde_json::from_str::<WeightMap>(r#"{"a": "x"}"#).is_err());
        assert!(serde_json::from_str::<WeightMap>("[1]").is_err());
    }

    #[test]
    fn a_stored_registry_survives_a_reopen_and_wins_over_the_config_unless_reset() {
        let dir = tempfile::tempdir().unwrap();
        let config = vec![AnalyzerEntry {
            id: "a".into(),
            weight: 1.0,
            endpoint: "http://127.0.0.1:1".into(),
            timeout_ms: 100,
            retry_count: 0,
        }];
        let mut changed = Registry::from_config(&config).unwrap();
        changed.set_weights(&weights(&[("a", 0.25)])).unwrap();
        {
            let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
            let (r, source) = load(&wal, &config, false).unwrap();
            assert_eq!((r.analyzers()[0].weight, source), (1.0, Source::Config));
            store(&wal, &changed).unwrap();
            wal.close().unwrap();
        }
        let (wal, _) = Wal::open(dir.path(), 1 << 20, 100).unwrap();
        let (r, source) = load(&wal, &config, false).unwrap();
        assert_eq!((r, source), (changed, Source::Stored));
        let (r, source) = load(&wal, &config, true).unwrap();
        assert_eq!((r.analyzers()[0].weight, source), (1.0, Source::Config));
    }
}
