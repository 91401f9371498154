//! Profiles: configuration (serde JSON), presets, and the decision itself.
//!
//! A profile is either *weighted* (filters, weighted scorers, a picker) or *cost* (filters
//! and a [`CostPolicy`]):
//!
//! ```json
//! {"scorers": [{"name": "prefix", "weight": 3, "params": {"length_weight": 0.2}},
//!              {"name": "queue", "weight": 2}],
//!  "filters": ["healthy", {"name": "max-queue", "params": {"max_waiting": 64}}],
//!  "picker": {"name": "max"}}
//!
//! {"kind": "cost", "overlap_weight": 1.0, "temperature": 0.0}
//! ```
//!
//! `filters` defaults to `["healthy"]` and `picker` to `{"name": "max"}`. Unknown fields and
//! unknown names are [`Error::Config`] errors that name the culprit and list what is valid.

use super::builtin::{LoadParams, LruParams, PrefixParams};
use super::picker::pick_softmax;
use super::{
    combine_into, Candidate, CostPolicy, Filter, HealthyFilter, KvUtilizationScorer,
    LoraLoadedFilter, LoraScorer, LruScorer, MaxPicker, MaxQueueFilter, Picker, PrefillScorer,
    PrefixScorer, QueueScorer, RandomScorer, RequestInfo, RoundRobinPicker, RunningScorer,
    ScoreContext, ScoreScratch, Scorer, SessionScorer, SoftmaxPicker, TierWeights, TtftParams,
    TtftPolicy, WeightedRandomPicker,
};
use crate::rng::SplitMix64;
use crate::types::WorkerId;
use crate::{Error, Result};
use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::fmt;

/// Names of the built-in scorers.
pub const SCORER_NAMES: [&str; 9] =
    ["prefix", "queue", "running", "prefill", "kv-utilization", "session", "lora", "lru", "random"];
/// Names of the built-in filters.
pub const FILTER_NAMES: [&str; 3] = ["healthy", "lora-loaded", "max-queue"];
/// Names of the built-in pickers.
pub const PICKER_NAMES: [&str; 5] = ["max", "softmax", "weighted-random", "round-robin", "ttft"];
/// Names of the presets ([`ProfileConfig::preset`]).
pub const PRESET_NAMES: [&str; 7] =
    ["kvroute", "session-affinity", "prefix", "llm-d", "cost", "random", "round-robin"];

fn unknown(what: &str, name: &str, valid: &[&str]) -> Error {
    Error::config(format!("unknown {what} `{name}`; valid {what}s: {}", valid.join(", ")))
}

/// The two kinds of profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    /// Filters, weighted scorers and a picker.
    #[default]
    Weighted,
    /// Filters and the Dynamo-style [`CostPolicy`].
    Cost,
}

fn one() -> f64 {
    1.0
}

/// One weighted scorer of a profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScorerConfig {
    /// The scorer's name (one of [`SCORER_NAMES`]).
    pub name: String,
    /// Its weight, finite and non-negative (default 1).
    #[serde(default = "one")]
    pub weight: f64,
    /// Scorer-specific parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl ScorerConfig {
    /// A scorer `name` with `weight` and default parameters.
    pub fn new(name: &str, weight: f64) -> Self {
        ScorerConfig { name: name.to_owned(), weight, params: None }
    }
}

/// One filter of a profile. In JSON, either a bare name (`"healthy"`) or an object
/// (`{"name": "max-queue", "params": {"max_waiting": 64}}`).
#[derive(Clone, Debug, PartialEq)]
pub struct FilterConfig {
    /// The filter's name (one of [`FILTER_NAMES`]).
    pub name: String,
    /// Filter-specific parameters.
    pub params: Option<Value>,
}

impl FilterConfig {
    /// A filter `name` without parameters.
    pub fn new(name: &str) -> Self {
        FilterConfig { name: name.to_owned(), params: None }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterConfigFull {
    name: String,
    #[serde(default)]
    params: Option<Value>,
}

impl<'de> Deserialize<'de> for FilterConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FilterConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a filter name or an object {\"name\": ..., \"params\": {...}}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<FilterConfig, E> {
                Ok(FilterConfig::new(s))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                m: A,
            ) -> std::result::Result<FilterConfig, A::Error> {
                let full = FilterConfigFull::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(FilterConfig { name: full.name, params: full.params })
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for FilterConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match &self.params {
            None => s.serialize_str(&self.name),
            Some(p) => {
                let mut st = s.serialize_struct("FilterConfig", 2)?;
                st.serialize_field("name", &self.name)?;
                st.serialize_field("params", p)?;
                st.end()
            }
        }
    }
}

/// The picker of a weighted profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PickerConfig {
    /// The picker's name (one of [`PICKER_NAMES`]).
    pub name: String,
    /// The temperature of the `softmax` picker (finite, non-negative; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Parameters of the `ttft` picker ([`TtftParams`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Value>,
}

impl PickerConfig {
    /// A picker `name` with default parameters.
    pub fn new(name: &str) -> Self {
        PickerConfig { name: name.to_owned(), temperature: None, params: None }
    }
}

fn default_filters() -> Vec<FilterConfig> {
    vec![FilterConfig::new("healthy")]
}

/// The configuration of a scoring profile; see the module documentation for the JSON form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// `weighted` (default) or `cost`.
    #[serde(default)]
    pub kind: ProfileKind,
    /// Weighted scorers (kind `weighted` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scorers: Vec<ScorerConfig>,
    /// Filters, applied in order (default `["healthy"]`).
    #[serde(default = "default_filters")]
    pub filters: Vec<FilterConfig>,
    /// The picker (kind `weighted` only; default `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picker: Option<PickerConfig>,
    /// Weight of the prefill term (kind `cost` only; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_weight: Option<f64>,
    /// Softmax temperature (kind `cost` only; default 0 = lowest cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Cache credit per tier (kind `cost` only; default GPU 1.0, CPU 0.8, disk 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_weights: Option<TierWeights>,
}

impl Default for ProfileConfig {
    /// A weighted profile with no scorer, the `healthy` filter and the `max` picker: every
    /// healthy worker ties, so the choice is uniform.
    fn default() -> Self {
        ProfileConfig {
            kind: ProfileKind::Weighted,
            scorers: Vec::new(),
            filters: default_filters(),
            picker: None,
            overlap_weight: None,
            temperature: None,
            tier_weights: None,
        }
    }
}

impl ProfileConfig {
    /// A weighted profile with these scorers, the `healthy` filter and `picker`.
    pub fn weighted(scorers: Vec<ScorerConfig>, picker: &str) -> Self {
        ProfileConfig { scorers, picker: Some(PickerConfig::new(picker)), ..Self::default() }
    }

    /// The preset `name` (one of [`PRESET_NAMES`]):
    ///
    /// - `kvroute` (the default of [`crate::router::RouterConfig`]): no scorer, the `ttft`
    ///   picker ([`TtftPolicy`]): the lowest predicted time to first token in seconds from
    ///   prefix matches (with the router's predicted residency), never-stale queued prefill
    ///   work and learned per-worker prefill rates, near-ties to the less loaded worker,
    ///   and a balance guard;
    /// - `session-affinity`: the session scorer alone with the max picker, as Kubernetes
    ///   `sessionAffinity: ClientIP`: a known key goes back to its worker, a new key to a
    ///   uniformly random one;
    /// - `prefix`: the prefix scorer alone;
    /// - `llm-d`: prefix 3, queue 2, KV utilization 2, max picker (llm-d's default
    ///   scheduler profile);
    /// - `cost`: the Dynamo-style cost policy, overlap weight 1, temperature 0;
    /// - `random`: the random scorer (a uniform choice);
    /// - `round-robin`: no scorer, the round-robin picker.
    ///
    /// All presets keep the `healthy` filter.
    pub fn preset(name: &str) -> Result<ProfileConfig> {
        let s = ScorerConfig::new;
        Ok(match name {
            "kvroute" => Self::weighted(Vec::new(), "ttft"),
            "session-affinity" => Self::weighted(vec![s("session", 1.0)], "max"),
            "prefix" => Self::weighted(vec![s("prefix", 1.0)], "max"),
            "llm-d" => Self::weighted(
                vec![s("prefix", 3.0), s("queue", 2.0), s("kv-utilization", 2.0)],
                "max",
            ),
            "cost" => ProfileConfig {
                kind: ProfileKind::Cost,
                overlap_weight: Some(1.0),
                temperature: Some(0.0),
                ..Self::default()
            },
            "random" => Self::weighted(vec![s("random", 1.0)], "max"),
            "round-robin" => Self::weighted(Vec::new(), "round-robin"),
            other => return Err(unknown("preset", other, &PRESET_NAMES)),
        })
    }

    /// Parses a profile from JSON and checks that it builds.
    pub fn from_json(json: &str) -> Result<ProfileConfig> {
        let cfg: ProfileConfig =
            serde_json::from_str(json).map_err(|e| Error::config(format!("profile JSON: {e}")))?;
        cfg.build()?;
        Ok(cfg)
    }

    /// The profile as JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Builds the profile, checking every name, weight and parameter.
    pub fn build(&self) -> Result<Profile> {
        let filters = self.filters.iter().map(build_filter).collect::<Result<Vec<_>>>()?;
        match self.kind {
            ProfileKind::Weighted => {
                for (field, set) in [
                    ("overlap_weight", self.overlap_weight.is_some()),
                    ("temperature", self.temperature.is_some()),
                    ("tier_weights", self.tier_weights.is_some()),
                ] {
                    if set {
                        return Err(Error::config(format!(
                            "field `{field}` applies only to kind `cost` (for a softmax picker \
                             use \"picker\": {{\"name\": \"softmax\", \"temperature\": ...}})"
                        )));
                    }
                }
                let mut scorers = Vec::with_capacity(self.scorers.len());
                for (i, sc) in self.scorers.iter().enumerate() {
                    if self.scorers[..i].iter().any(|p| p.name == sc.name) {
                        return Err(Error::config(format!(
                            "scorer `{}` is listed twice; give it one weight",
                            sc.name
                        )));
                    }
                    scorers.push((build_scorer(sc)?, sc.weight));
                }
                if let Some(p) = self.picker.as_ref().filter(|p| p.name == "ttft") {
                    if !scorers.is_empty() {
                        return Err(Error::config(
                            "picker `ttft` computes its own cost in seconds; remove `scorers`",
                        ));
                    }
                    if p.temperature.is_some() {
                        return Err(Error::config(
                            "picker `ttft`: field `temperature` applies only to picker `softmax`",
                        ));
                    }
                    let params: TtftParams = parse_params("picker `ttft`", &p.params)?;
                    return Ok(Profile {
                        filters,
                        body: Body::Ttft(TtftPolicy::from_params(&params)?),
                    });
                }
                let picker = match &self.picker {
                    None => Box::new(MaxPicker) as Box<dyn Picker>,
                    Some(p) => build_picker(p)?,
                };
                Profile::weighted(filters, scorers, picker)
            }
            ProfileKind::Cost => {
                if !self.scorers.is_empty() {
                    return Err(Error::config(
                        "field `scorers` applies only to kind `weighted`; kind `cost` computes \
                         its own cost",
                    ));
                }
                if self.picker.is_some() {
                    return Err(Error::config(
                        "field `picker` applies only to kind `weighted`; kind `cost` picks by \
                         `temperature`",
                    ));
                }
                let d = CostPolicy::default();
                let policy = CostPolicy {
                    overlap_weight: self.overlap_weight.unwrap_or(d.overlap_weight),
                    temperature: self.temperature.unwrap_or(d.temperature),
                    tiers: self.tier_weights.unwrap_or(d.tiers),
                };
                Profile::cost(filters, policy)
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaxQueueParams {
    max_waiting: u32,
}

fn parse_params<P: DeserializeOwned + Default>(what: &str, v: &Option<Value>) -> Result<P> {
    match v {
        None | Some(Value::Null) => Ok(P::default()),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::config(format!("{what} params: {e}"))),
    }
}

fn build_scorer(c: &ScorerConfig) -> Result<Box<dyn Scorer>> {
    let what = format!("scorer `{}`", c.name);
    let p = &c.params;
    let s: Box<dyn Scorer> = match c.name.as_str() {
        "prefix" => Box::new(PrefixScorer::from_params(parse_params::<PrefixParams>(&what, p)?)?),
        "queue" => Box::new(QueueScorer {
            norm: parse_params::<LoadParams>(&what, p)?
                .to_norm("queue", QueueScorer::DEFAULT_NORM)?,
        }),
        "running" => Box::new(RunningScorer {
            norm: parse_params::<LoadParams>(&what, p)?
                .to_norm("running", RunningScorer::DEFAULT_NORM)?,
        }),
        "prefill" => Box::new(PrefillScorer {
            norm: parse_params::<LoadParams>(&what, p)?
                .to_norm("prefill", PrefillScorer::DEFAULT_NORM)?,
        }),
        "kv-utilization" => {
            parse_params::<NoParams>(&what, p)?;
            Box::new(KvUtilizationScorer)
        }
        "session" => {
            parse_params::<NoParams>(&what, p)?;
            Box::new(SessionScorer)
        }
        "lora" => {
            parse_params::<NoParams>(&what, p)?;
            Box::new(LoraScorer)
        }
        "lru" => Box::new(LruScorer {
            cold_only: parse_params::<LruParams>(&what, p)?.cold_only.unwrap_or(true),
        }),
        "random" => {
            parse_params::<NoParams>(&what, p)?;
            Box::new(RandomScorer)
        }
        other => return Err(unknown("scorer", other, &SCORER_NAMES)),
    };
    Ok(s)
}

fn build_filter(c: &FilterConfig) -> Result<Box<dyn Filter>> {
    let what = format!("filter `{}`", c.name);
    let f: Box<dyn Filter> = match c.name.as_str() {
        "healthy" => {
            parse_params::<NoParams>(&what, &c.params)?;
            Box::new(HealthyFilter)
        }
        "lora-loaded" => {
            parse_params::<NoParams>(&what, &c.params)?;
            Box::new(LoraLoadedFilter)
        }
        "max-queue" => {
            let Some(v) = &c.params else {
                return Err(Error::config(format!("{what} needs params {{\"max_waiting\": N}}")));
            };
            let p: MaxQueueParams = serde_json::from_value(v.clone())
                .map_err(|e| Error::config(format!("{what} params: {e}")))?;
            Box::new(MaxQueueFilter { max_waiting: p.max_waiting })
        }
        other => return Err(unknown("filter", other, &FILTER_NAMES)),
    };
    Ok(f)
}

fn build_picker(c: &PickerConfig) -> Result<Box<dyn Picker>> {
    if c.params.is_some() {
        return Err(Error::config(format!(
            "picker `{}`: field `params` applies only to picker `ttft`",
            c.name
        )));
    }
    if c.temperature.is_some() && c.name != "softmax" {
        return Err(Error::config(format!(
            "picker `{}`: field `temperature` applies only to picker `softmax`",
            c.name
        )));
    }
    Ok(match c.name.as_str() {
        "max" => Box::new(MaxPicker),
        "softmax" => {
            let t = c.temperature.unwrap_or(1.0);
            if !(t.is_finite() && t >= 0.0) {
                return Err(Error::config(format!(
                    "picker `softmax`: temperature must be finite and non-negative, got {t}"
                )));
            }
            Box::new(SoftmaxPicker { temperature: t })
        }
        "weighted-random" => Box::new(WeightedRandomPicker),
        "round-robin" => Box::new(RoundRobinPicker::new()),
        other => return Err(unknown("picker", other, &PICKER_NAMES)),
    })
}

enum Body {
    Weighted { scorers: Vec<(Box<dyn Scorer>, f64)>, picker: Box<dyn Picker> },
    Cost(CostPolicy),
    Ttft(TtftPolicy),
}

/// A built scoring profile: filters, then weighted scorers and a picker, or the cost policy.
/// Shareable across threads (`Send + Sync`); only the round-robin picker keeps state.
pub struct Profile {
    filters: Vec<Box<dyn Filter>>,
    body: Body,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let filters: Vec<&str> = self.filters.iter().map(|x| x.name()).collect();
        match &self.body {
            Body::Weighted { scorers, picker } => {
                let s: Vec<(&str, f64)> = scorers.iter().map(|(s, w)| (s.name(), *w)).collect();
                f.debug_struct("Profile")
                    .field("filters", &filters)
                    .field("scorers", &s)
                    .field("picker", &picker.name())
                    .finish()
            }
            Body::Cost(p) => {
                f.debug_struct("Profile").field("filters", &filters).field("cost", p).finish()
            }
            Body::Ttft(p) => {
                f.debug_struct("Profile").field("filters", &filters).field("ttft", p).finish()
            }
        }
    }
}

/// The outcome of [`Profile::decide`]: which candidate was picked (the router turns it into
/// a [`crate::router::Decision`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    /// Index of the chosen candidate in the `cands` slice given to `decide`.
    pub index: usize,
    /// Position of the chosen candidate among the kept ones (index into
    /// [`ScoreScratch::totals`] and the explanation rows).
    pub kept_pos: usize,
    /// The chosen worker.
    pub worker: WorkerId,
    /// The chosen candidate's total.
    pub total: f64,
}

/// Why a decision came out as it did: the kept candidates, their totals and every row of
/// per-candidate values (one per scorer, clamped as combined; or the cost policy's
/// `prefill_blocks`, `decode_blocks` and `cost`).
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation<'a> {
    /// Original indices of the kept candidates.
    pub kept: &'a [usize],
    /// Total per kept candidate.
    pub totals: &'a [f64],
    /// `(row name, value per kept candidate)`.
    pub rows: Vec<(&'a str, &'a [f64])>,
}

impl Profile {
    /// A weighted profile from parts. Weights must be finite and non-negative.
    pub fn weighted(
        filters: Vec<Box<dyn Filter>>,
        scorers: Vec<(Box<dyn Scorer>, f64)>,
        picker: Box<dyn Picker>,
    ) -> Result<Profile> {
        for (s, w) in &scorers {
            if !(w.is_finite() && *w >= 0.0) {
                return Err(Error::config(format!(
                    "scorer `{}`: weight must be finite and non-negative, got {w}",
                    s.name()
                )));
            }
        }
        Ok(Profile { filters, body: Body::Weighted { scorers, picker } })
    }

    /// A cost profile from parts.
    pub fn cost(filters: Vec<Box<dyn Filter>>, policy: CostPolicy) -> Result<Profile> {
        policy.validate()?;
        Ok(Profile { filters, body: Body::Cost(policy) })
    }

    /// The preset `name`, built ([`ProfileConfig::preset`]).
    pub fn preset(name: &str) -> Result<Profile> {
        ProfileConfig::preset(name)?.build()
    }

    /// The profile's kind (a `ttft` picker profile is of kind weighted).
    pub fn kind(&self) -> ProfileKind {
        match self.body {
            Body::Weighted { .. } | Body::Ttft(_) => ProfileKind::Weighted,
            Body::Cost(_) => ProfileKind::Cost,
        }
    }

    /// The `ttft` picker's policy, if this profile uses it.
    pub fn ttft(&self) -> Option<&TtftPolicy> {
        match &self.body {
            Body::Ttft(p) => Some(p),
            _ => None,
        }
    }

    /// Sets the block size the `ttft` picker converts matched blocks to tokens with (the
    /// router sets its own).
    pub fn set_block_size(&mut self, block_size: usize) {
        if let Body::Ttft(p) = &mut self.body {
            p.block_size = u32::try_from(block_size).unwrap_or(u32::MAX);
        }
    }

    /// Whether the profile reads prefix matches; when `false` (random, round-robin,
    /// session-affinity, a cost profile with `overlap_weight` 0) the router may skip index
    /// matching and pass zero matches.
    pub fn needs_prefix(&self) -> bool {
        match &self.body {
            Body::Weighted { scorers, .. } => scorers.iter().any(|(s, _)| s.needs_prefix()),
            Body::Cost(p) => p.overlap_weight > 0.0,
            Body::Ttft(_) => true,
        }
    }

    /// Whether the profile reads the session table (the router should then record each
    /// request's session key with the chosen worker).
    pub fn uses_sessions(&self) -> bool {
        match &self.body {
            Body::Weighted { scorers, .. } => scorers.iter().any(|(s, _)| s.uses_sessions()),
            Body::Cost(_) | Body::Ttft(_) => false,
        }
    }

    /// The largest total a candidate can get: the sum of the weights (1 for a cost profile).
    pub fn max_total(&self) -> f64 {
        match &self.body {
            Body::Weighted { scorers, .. } => scorers.iter().map(|(_, w)| *w).sum(),
            Body::Cost(_) | Body::Ttft(_) => 1.0,
        }
    }

    /// Names of the explanation rows, in order.
    pub fn row_names(&self) -> Vec<&str> {
        match &self.body {
            Body::Weighted { scorers, .. } => scorers.iter().map(|(s, _)| s.name()).collect(),
            Body::Cost(_) => CostPolicy::ROWS.to_vec(),
            Body::Ttft(_) => TtftPolicy::ROWS.to_vec(),
        }
    }

    /// Filters `cands`, scores the kept ones, combines and picks.
    ///
    /// Returns [`Error::NoWorkers`] when `cands` is empty or every candidate is filtered
    /// out. After the call, `scratch` holds the explanation ([`Profile::explain`]).
    /// Allocation-free once `scratch` has grown, except that a filter dropping some
    /// candidates copies the kept ones into the scratch.
    pub fn decide(
        &self,
        req: &RequestInfo,
        cands: &[Candidate],
        ctx: &ScoreContext,
        rng: &mut SplitMix64,
        scratch: &mut ScoreScratch,
    ) -> Result<Pick> {
        let ScoreScratch { kept, filtered, rows, n_rows, totals } = scratch;
        kept.clear();
        // `rows` is cleared by the bodies that need zeros (see `Body::Ttft`); with
        // `n_rows` 0 none of it is visible through `ScoreScratch::row`.
        totals.clear();
        *n_rows = 0;
        if cands.is_empty() {
            return Err(Error::NoWorkers("no candidate workers".into()));
        }
        for (i, c) in cands.iter().enumerate() {
            if self.filters.iter().all(|f| f.keep(req, c)) {
                kept.push(i);
            }
        }
        if kept.is_empty() {
            let names: Vec<&str> = self.filters.iter().map(|f| f.name()).collect();
            return Err(Error::NoWorkers(format!(
                "all {} candidates were filtered out by [{}]",
                cands.len(),
                names.join(", ")
            )));
        }
        let view: &[Candidate] = if kept.len() == cands.len() {
            cands
        } else {
            filtered.clear();
            filtered.extend(kept.iter().map(|&i| cands[i].clone()));
            filtered
        };
        let n = view.len();
        totals.resize(n, 0.0);
        let pos = match &self.body {
            Body::Weighted { scorers, picker } => {
                *n_rows = scorers.len();
                rows.clear();
                rows.resize(scorers.len() * n, 0.0);
                let ctx = ScoreContext { seed: rng.next_u64(), ..*ctx };
                for (j, (s, w)) in scorers.iter().enumerate() {
                    let row = &mut rows[j * n..(j + 1) * n];
                    s.score(req, view, &ctx, row);
                    combine_into(*w, row, totals);
                }
                picker.pick(totals, rng)
            }
            Body::Cost(p) => {
                *n_rows = CostPolicy::ROWS.len();
                rows.clear();
                rows.resize(CostPolicy::ROWS.len() * n, 0.0);
                p.evaluate(req, view, rows, totals);
                pick_softmax(totals, p.temperature, rng)
            }
            Body::Ttft(p) => {
                *n_rows = TtftPolicy::ROWS.len();
                // No zero fill (3 kB for 64 candidates, every route): `evaluate` writes
                // every cell of its six rows, so only the cells new to the buffer are
                // zeroed here, and only when the candidate count grows.
                rows.resize(TtftPolicy::ROWS.len() * n, 0.0);
                p.evaluate(req, view, rows, totals, rng)
            }
        };
        if pos >= n {
            return Err(Error::Internal(format!("picker returned index {pos} of {n} candidates")));
        }
        Ok(Pick { index: kept[pos], kept_pos: pos, worker: view[pos].worker, total: totals[pos] })
    }

    /// The explanation of the last decision made with `scratch` by this profile.
    pub fn explain<'a>(&'a self, scratch: &'a ScoreScratch) -> Explanation<'a> {
        let rows = self
            .row_names()
            .into_iter()
            .enumerate()
            .map(|(j, name)| (name, scratch.row(j)))
            .collect();
        Explanation { kept: scratch.kept(), totals: scratch.totals(), rows }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Load, SessionTable};
    use super::*;

    fn err(json: &str) -> String {
        match ProfileConfig::from_json(json) {
            Err(Error::Config(m)) => m,
            other => panic!("expected a config error for {json}, got {other:?}"),
        }
    }

    #[test]
    fn presets_build() {
        for name in PRESET_NAMES {
            let p = Profile::preset(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expect_prefix = matches!(name, "kvroute" | "prefix" | "llm-d" | "cost");
            assert_eq!(p.ttft().is_some(), name == "kvroute", "{name}");
            assert_eq!(p.needs_prefix(), expect_prefix, "{name}");
            assert_eq!(p.uses_sessions(), name == "session-affinity", "{name}");
            // Presets survive a JSON round trip.
            let cfg = ProfileConfig::preset(name).unwrap();
            assert_eq!(ProfileConfig::from_json(&cfg.to_json()).unwrap(), cfg, "{name}");
        }
        let zero = r#"{"kind": "cost", "overlap_weight": 0}"#;
        assert!(!ProfileConfig::from_json(zero).unwrap().build().unwrap().needs_prefix());
        let lru = r#"{"scorers": [{"name": "lru", "params": {"cold_only": false}}]}"#;
        assert!(!ProfileConfig::from_json(lru).unwrap().build().unwrap().needs_prefix());
        let lru = r#"{"scorers": [{"name": "lru"}]}"#;
        assert!(ProfileConfig::from_json(lru).unwrap().build().unwrap().needs_prefix());
        let e = ProfileConfig::preset("nope").unwrap_err().to_string();
        assert!(e.contains("`nope`") && e.contains("llm-d") && e.contains("round-robin"), "{e}");
    }

    #[test]
    fn profile_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Profile>();
        assert_send_sync::<SessionTable>();
    }

    #[test]
    fn llm_d_weights() {
        let cfg = ProfileConfig::preset("llm-d").unwrap();
        let w: Vec<(&str, f64)> = cfg.scorers.iter().map(|s| (s.name.as_str(), s.weight)).collect();
        assert_eq!(w, vec![("prefix", 3.0), ("queue", 2.0), ("kv-utilization", 2.0)]);
        assert_eq!(cfg.picker, Some(PickerConfig::new("max")));
        let p = cfg.build().unwrap();
        assert_eq!(p.max_total(), 7.0);
        assert_eq!(p.row_names(), vec!["prefix", "queue", "kv-utilization"]);
        assert_eq!(p.kind(), ProfileKind::Weighted);
    }

    #[test]
    fn json_example_parses() {
        let cfg = ProfileConfig::from_json(
            r#"{"scorers": [{"name": "prefix", "weight": 3, "params": {"length_weight": 0.2,
                 "tier_weights": {"cpu": 0.5}}}, {"name": "queue", "weight": 2,
                 "params": {"norm": "scale", "scale": 4}}],
                "filters": ["healthy", {"name": "max-queue", "params": {"max_waiting": 8}}],
                "picker": {"name": "softmax", "temperature": 0.1}}"#,
        )
        .unwrap();
        assert_eq!(cfg.filters.len(), 2);
        assert_eq!(cfg.filters[1].name, "max-queue");
        let cost = ProfileConfig::from_json(r#"{"kind": "cost", "overlap_weight": 2.0}"#).unwrap();
        assert_eq!(cost.kind, ProfileKind::Cost);
        assert_eq!(cost.filters, vec![FilterConfig::new("healthy")]);
        // Explicitly no filters.
        let none = ProfileConfig::from_json(r#"{"filters": []}"#).unwrap();
        assert!(none.filters.is_empty());
    }

    #[test]
    fn json_errors_name_the_culprit() {
        let m = err(r#"{"scorer": []}"#);
        assert!(m.contains("unknown field `scorer`"), "{m}");
        let m = err(r#"{"scorers": [{"name": "prefix", "wieght": 3}]}"#);
        assert!(m.contains("`wieght`"), "{m}");
        let m = err(r#"{"scorers": [{"name": "prefx"}]}"#);
        assert!(m.contains("`prefx`") && m.contains("kv-utilization") && m.contains("lru"), "{m}");
        let m = err(r#"{"scorers": [{"name": "prefix", "params": {"length_wieght": 1}}]}"#);
        assert!(m.contains("scorer `prefix`") && m.contains("`length_wieght`"), "{m}");
        let m = err(r#"{"scorers": [{"name": "queue", "params": {"norm": "log"}}]}"#);
        assert!(m.contains("`log`"), "{m}");
        let m = err(r#"{"scorers": [{"name": "session", "params": {"ttl": 5}}]}"#);
        assert!(m.contains("`ttl`"), "{m}");
        let m = err(r#"{"filters": ["healty"]}"#);
        assert!(m.contains("`healty`") && m.contains("max-queue"), "{m}");
        let m = err(r#"{"filters": [{"name": "max-queue", "parms": {}}]}"#);
        assert!(m.contains("`parms`"), "{m}");
        let m = err(r#"{"filters": ["max-queue"]}"#);
        assert!(m.contains("max_waiting"), "{m}");
        let m = err(r#"{"filters": [{"name": "max-queue", "params": {"max_wait": 3}}]}"#);
        assert!(m.contains("`max_wait`"), "{m}");
        let m = err(r#"{"picker": {"name": "argmax"}}"#);
        assert!(m.contains("`argmax`") && m.contains("weighted-random"), "{m}");
        let m = err(r#"{"picker": {"name": "max", "temperature": 1}}"#);
        assert!(m.contains("`temperature`"), "{m}");
        let m = err(r#"{"kind": "costly"}"#);
        assert!(m.contains("`costly`"), "{m}");
        let m = err(r#"{"temperature": 0.5}"#);
        assert!(m.contains("`temperature`") && m.contains("cost"), "{m}");
        let m = err(r#"{"kind": "cost", "scorers": [{"name": "prefix"}]}"#);
        assert!(m.contains("`scorers`"), "{m}");
        let m = err(r#"{"kind": "cost", "picker": {"name": "max"}}"#);
        assert!(m.contains("`picker`"), "{m}");
        let m = err(r#"{"kind": "cost", "temperature": -1}"#);
        assert!(m.contains("temperature"), "{m}");
        let m = err(r#"{"scorers": [{"name": "queue", "weight": -1}]}"#);
        assert!(m.contains("weight") && m.contains("queue"), "{m}");
        let m = err(r#"{"scorers": [{"name": "queue"}, {"name": "queue", "weight": 2}]}"#);
        assert!(m.contains("twice"), "{m}");
        let m = err(r#"{"scorers": "#);
        assert!(m.contains("profile JSON"), "{m}");
    }

    fn cands_llmd() -> Vec<Candidate> {
        let mk = |w: u32, matched: u32, waiting: u32, kv: f64| {
            let mut c = Candidate::new(WorkerId(w));
            c.matched_blocks = matched;
            c.matched_by_tier = [matched, 0, 0];
            c.load = Load { waiting, kv_usage: kv, ..Load::default() };
            c
        };
        vec![mk(0, 8, 4, 0.5), mk(1, 2, 0, 0.1), mk(2, 10, 8, 0.9), mk(3, 0, 2, 0.0)]
    }

    #[test]
    fn llm_d_decision_by_hand() {
        let p = Profile::preset("llm-d").unwrap();
        let t = SessionTable::default();
        let req = RequestInfo { prompt_tokens: 170, total_blocks: 10, ..Default::default() };
        let cands = cands_llmd();
        let mut s = ScoreScratch::new();
        let d = p
            .decide(&req, &cands, &ScoreContext::new(&t), &mut SplitMix64::new(1), &mut s)
            .unwrap();
        // prefix share: .8 .2 1 0 ; queue (8-q)/8: .5 1 0 .75 ; kv 1-u: .5 .9 .1 1
        // totals: 3*.8+2*.5+2*.5 = 4.4 ; .6+2+1.8 = 4.4 ; 3+0+.2 = 3.2 ; 0+1.5+2 = 3.5
        let e = p.explain(&s);
        assert_eq!(e.kept, &[0, 1, 2, 3]);
        let want = [4.4, 4.4, 3.2, 3.5];
        for (a, b) in e.totals.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{:?}", e.totals);
        }
        assert_eq!(e.rows[0].0, "prefix");
        assert_eq!(e.rows[1].1, &[0.5, 1.0, 0.0, 0.75]);
        // 0 and 1 tie within 1e-9: either may win, and both do over seeds.
        assert!(d.index == 0 || d.index == 1);
        let mut seen = [false; 2];
        for seed in 0..64 {
            let d = p
                .decide(&req, &cands, &ScoreContext::new(&t), &mut SplitMix64::new(seed), &mut s)
                .unwrap();
            assert_eq!(d.worker, WorkerId(d.index as u32));
            seen[d.index] = true;
        }
        assert_eq!(seen, [true, true]);
    }

    #[test]
    fn filtered_candidates_are_never_chosen() {
        let p = Profile::preset("llm-d").unwrap();
        let t = SessionTable::default();
        let req = RequestInfo { prompt_tokens: 170, total_blocks: 10, ..Default::default() };
        let mut cands = cands_llmd();
        cands[0].healthy = false;
        cands[1].healthy = false;
        let mut s = ScoreScratch::new();
        let d = p
            .decide(&req, &cands, &ScoreContext::new(&t), &mut SplitMix64::new(1), &mut s)
            .unwrap();
        // Among 2 and 3: queue (8-q)/6 -> 0, 1 ; totals 3+0+.2 = 3.2 vs 0+2+2 = 4.
        assert_eq!(s.kept(), &[2, 3]);
        assert_eq!(d.index, 3);
        assert_eq!(d.kept_pos, 1);
        assert!((d.total - 4.0).abs() < 1e-12);
        for c in cands.iter_mut() {
            c.healthy = false;
        }
        let e = p.decide(&req, &cands, &ScoreContext::new(&t), &mut SplitMix64::new(1), &mut s);
        assert!(matches!(&e, Err(Error::NoWorkers(m)) if m.contains("healthy")), "{e:?}");
        let e = p.decide(&req, &[], &ScoreContext::new(&t), &mut SplitMix64::new(1), &mut s);
        assert!(matches!(e, Err(Error::NoWorkers(_))));
    }

    #[test]
    fn session_affinity_sticks_and_new_keys_spread() {
        let p = Profile::preset("session-affinity").unwrap();
        let mut t = SessionTable::default();
        let cands: Vec<Candidate> = (0..4).map(|w| Candidate::new(WorkerId(w))).collect();
        let mut rng = SplitMix64::new(99);
        let mut s = ScoreScratch::new();
        // New keys: uniform over workers.
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let key = format!("10.0.{}.{}", i / 256, i % 256);
            let req = RequestInfo { session: Some(&key), now_ms: 1, ..Default::default() };
            let d = p.decide(&req, &cands, &ScoreContext::new(&t), &mut rng, &mut s).unwrap();
            counts[d.index] += 1;
            t.record(&key, d.worker, 1);
        }
        for c in counts {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
        // Known keys: always back to their worker.
        for i in 0..200 {
            let key = format!("10.0.{}.{}", i / 256, i % 256);
            let want = t.get(&key, 2).unwrap();
            let req = RequestInfo { session: Some(&key), now_ms: 2, ..Default::default() };
            let d = p.decide(&req, &cands, &ScoreContext::new(&t), &mut rng, &mut s).unwrap();
            assert_eq!(d.worker, want);
        }
        // The sticky worker turns unhealthy: the request goes elsewhere.
        let key = "10.0.0.0";
        let sticky = t.get(key, 2).unwrap();
        let mut sick = cands.clone();
        sick[sticky.index()].healthy = false;
        let req = RequestInfo { session: Some(key), now_ms: 2, ..Default::default() };
        let d = p.decide(&req, &sick, &ScoreContext::new(&t), &mut rng, &mut s).unwrap();
        assert_ne!(d.worker, sticky);
    }

    #[test]
    fn cost_profile_argmin_and_softmax() {
        let t = SessionTable::default();
        let req = RequestInfo { prompt_tokens: 160, total_blocks: 10, ..Default::default() };
        let mk = |w: u32, matched: u32, decode: u64| {
            let mut c = Candidate::new(WorkerId(w));
            c.matched_blocks = matched;
            c.load.decode_blocks = decode;
            c
        };
        // costs: 10-6+2 = 6 ; 10-0+0 = 10 ; 10-10+8 = 8
        let cands = vec![mk(0, 6, 2), mk(1, 0, 0), mk(2, 10, 8)];
        let p = Profile::preset("cost").unwrap();
        let mut s = ScoreScratch::new();
        for seed in 0..50 {
            let d = p
                .decide(&req, &cands, &ScoreContext::new(&t), &mut SplitMix64::new(seed), &mut s)
                .unwrap();
            assert_eq!(d.index, 0);
        }
        let e = p.explain(&s);
        assert_eq!(e.rows[2], ("cost", &[6.0, 10.0, 8.0][..]));
        assert_eq!(e.rows[0], ("prefill_blocks", &[4.0, 10.0, 0.0][..]));
        assert_eq!(e.totals, &[1.0, 0.0, 0.5]);

        // Temperature 0.5: p_i ∝ exp(-x_i / 0.5) with x = (cost - 6) / 4 = 0, 1, 0.5.
        let p = ProfileConfig::from_json(r#"{"kind": "cost", "temperature": 0.5}"#)
            .unwrap()
            .build()
            .unwrap();
        let w = [1.0, (-2.0f64).exp(), (-1.0f64).exp()];
        let z: f64 = w.iter().sum();
        let mut counts = [0u32; 3];
        let mut rng = SplitMix64::new(4);
        let n = 30_000;
        for _ in 0..n {
            counts[p
                .decide(&req, &cands, &ScoreContext::new(&t), &mut rng, &mut s)
                .unwrap()
                .index] += 1;
        }
        for k in 0..3 {
            let got = counts[k] as f64 / n as f64;
            assert!((got - w[k] / z).abs() < 0.015, "{k}: {got} vs {}", w[k] / z);
        }
    }

    #[test]
    fn round_robin_cycles_over_kept() {
        let p = Profile::preset("round-robin").unwrap();
        let t = SessionTable::default();
        let mut cands: Vec<Candidate> = (0..3).map(|w| Candidate::new(WorkerId(w))).collect();
        cands[1].healthy = false;
        let mut s = ScoreScratch::new();
        let mut rng = SplitMix64::new(0);
        let got: Vec<usize> = (0..4)
            .map(|_| {
                p.decide(&RequestInfo::default(), &cands, &ScoreContext::new(&t), &mut rng, &mut s)
                    .unwrap()
                    .index
            })
            .collect();
        assert_eq!(got, vec![0, 2, 0, 2]);
    }

    /// A scorer returning fixed out-of-range values, to check the clamp inside `decide`.
    struct Wild;
    impl Scorer for Wild {
        fn name(&self) -> &str {
            "wild"
        }
        fn score(&self, _: &RequestInfo, _: &[Candidate], _: &ScoreContext, out: &mut [f64]) {
            let vals = [2.0, -1.0, f64::NAN, 0.5];
            for (o, v) in out.iter_mut().zip(vals) {
                *o = v;
            }
        }
    }

    #[test]
    fn custom_scorer_is_clamped() {
        let p = Profile::weighted(Vec::new(), vec![(Box::new(Wild), 4.0)], Box::new(MaxPicker))
            .unwrap();
        let t = SessionTable::default();
        let cands: Vec<Candidate> = (0..4).map(|w| Candidate::new(WorkerId(w))).collect();
        let mut s = ScoreScratch::new();
        let d = p
            .decide(
                &RequestInfo::default(),
                &cands,
                &ScoreContext::new(&t),
                &mut SplitMix64::new(0),
                &mut s,
            )
            .unwrap();
        assert_eq!(d.index, 0);
        assert_eq!(s.totals(), &[4.0, 0.0, 0.0, 2.0]);
        assert_eq!(s.row(0), &[1.0, 0.0, 0.0, 0.5]);
        assert!(Profile::weighted(
            Vec::new(),
            vec![(Box::new(Wild), f64::NAN)],
            Box::new(MaxPicker)
        )
        .is_err());
    }

    mod props {
        use super::super::super::{LoraSet, SessionTable};
        use super::*;
        use proptest::prelude::*;

        fn arb_candidate() -> impl Strategy<Value = Candidate> {
            (
                any::<bool>(),
                0u32..20,
                (0u32..8, 0u32..8, 0u32..8),
                (0u32..10, 0u32..10, 0u64..5000, -0.5f64..1.5, 0u64..100),
                prop::option::of(0u64..2000),
                prop::option::of(prop::sample::select(vec!["a", "b"])),
            )
                .prop_map(
                    |(sick, matched, (g, c, d), (w, r, p, kv, dec), last, lora)| {
                        let mut cand = Candidate::new(WorkerId(0));
                        cand.healthy = !sick || matched % 3 == 0;
                        cand.matched_blocks = matched;
                        cand.matched_by_tier = [g.min(matched), c.min(matched - g.min(matched)), d];
                        cand.load = Load {
                            waiting: w,
                            running: r,
                            inflight_prefill_tokens: p,
                            kv_usage: kv,
                            decode_blocks: dec,
                            pending_prefill_tokens: p / 2,
                            active_requests: w + r,
                            prefill_tokens_per_s: if dec % 4 == 0 {
                                0.0
                            } else {
                                dec as f64 * 100.0
                            },
                            eviction_horizon_s: 0.0,
                        };
                        cand.last_routed_ms = last;
                        if let Some(l) = lora {
                            cand.loaded_loras = LoraSet::from_names([l]).unwrap();
                        }
                        cand
                    },
                )
        }

        fn arb_config() -> impl Strategy<Value = ProfileConfig> {
            let preset = prop::sample::select(PRESET_NAMES.to_vec())
                .prop_map(|n| ProfileConfig::preset(n).unwrap());
            let weighted = (
                prop::collection::vec((any::<bool>(), 0.0f64..5.0), SCORER_NAMES.len()),
                any::<bool>(),
                prop::option::of(0u32..8),
                any::<bool>(),
                prop::sample::select(PICKER_NAMES.to_vec()),
                0.0f64..2.0,
            )
                .prop_map(|(pick, healthy, maxq, lora, picker, temp)| {
                    // The `ttft` picker computes its own cost: no scorers with it.
                    let scorers = SCORER_NAMES
                        .iter()
                        .zip(pick)
                        .filter(|(_, (on, _))| *on && picker != "ttft")
                        .map(|(n, (_, w))| ScorerConfig::new(n, w))
                        .collect();
                    let mut filters = Vec::new();
                    if healthy {
                        filters.push(FilterConfig::new("healthy"));
                    }
                    if let Some(m) = maxq {
                        filters.push(FilterConfig {
                            name: "max-queue".into(),
                            params: Some(serde_json::json!({ "max_waiting": m })),
                        });
                    }
                    if lora {
                        filters.push(FilterConfig::new("lora-loaded"));
                    }
                    let mut pc = PickerConfig::new(picker);
                    if picker == "softmax" {
                        pc.temperature = Some(temp);
                    }
                    ProfileConfig { scorers, filters, picker: Some(pc), ..ProfileConfig::default() }
                });
            let cost = (0.0f64..3.0, 0.0f64..2.0, any::<bool>()).prop_map(|(ow, t, healthy)| {
                ProfileConfig {
                    kind: ProfileKind::Cost,
                    overlap_weight: Some(ow),
                    temperature: Some(t),
                    filters: if healthy { default_filters() } else { Vec::new() },
                    ..ProfileConfig::default()
                }
            });
            prop_oneof![preset, weighted, cost]
        }

        /// The filters of `cfg`, evaluated independently of the filter types.
        fn keeps(cfg: &ProfileConfig, req: &RequestInfo, c: &Candidate) -> bool {
            cfg.filters.iter().all(|f| match f.name.as_str() {
                "healthy" => c.healthy,
                "max-queue" => {
                    let m = f.params.as_ref().unwrap()["max_waiting"].as_u64().unwrap();
                    u64::from(c.load.waiting) <= m
                }
                "lora-loaded" => req.lora.is_none_or(|l| c.loaded_loras.contains(l)),
                other => panic!("unexpected filter {other}"),
            })
        }

        proptest! {
            #[test]
            fn decide_picks_a_kept_candidate_with_bounded_totals(
                cfg in arb_config(),
                mut cands in prop::collection::vec(arb_candidate(), 0..10),
                seed in any::<u64>(),
                lora in prop::option::of(prop::sample::select(vec!["a", "b"])),
                session in prop::option::of(prop::sample::select(vec!["s1", "s2"])),
                total_blocks in 0u32..16,
                now in 0u64..3000,
            ) {
                for (i, c) in cands.iter_mut().enumerate() {
                    c.worker = WorkerId(i as u32);
                }
                let mut t = SessionTable::new(4, 1000).unwrap();
                t.record("s1", WorkerId(1), 0);
                let req = RequestInfo {
                    prompt_tokens: total_blocks * 16,
                    total_blocks,
                    session,
                    lora,
                    now_ms: now,
                    shared_blocks: 0,
                    shared_share: 0.0,
                    tail_ttft_s: 0.0,
                };
                let profile = cfg.build().unwrap();
                let bound = profile.max_total();
                let kept: Vec<usize> =
                    (0..cands.len()).filter(|&i| keeps(&cfg, &req, &cands[i])).collect();
                let mut s = ScoreScratch::new();
                let mut rng = SplitMix64::new(seed);
                match profile.decide(&req, &cands, &ScoreContext::new(&t), &mut rng, &mut s) {
                    Ok(d) => {
                        prop_assert!(kept.contains(&d.index));
                        prop_assert_eq!(s.kept(), &kept[..]);
                        prop_assert_eq!(d.worker, cands[d.index].worker);
                        prop_assert_eq!(s.kept()[d.kept_pos], d.index);
                        for &x in s.totals() {
                            prop_assert!((0.0..=bound).contains(&x), "{} not in [0, {}]", x, bound);
                        }
                        let e = profile.explain(&s);
                        prop_assert_eq!(e.rows.len(), profile.row_names().len());
                        for (_, row) in &e.rows {
                            prop_assert_eq!(row.len(), kept.len());
                        }
                    }
                    Err(Error::NoWorkers(_)) => prop_assert!(kept.is_empty()),
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                }
            }
        }
    }
}
