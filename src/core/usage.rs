//! Usage records and money, pure (SPEC §9): what a record posted to `/usage` says, what it costs,
//! and how amounts are written.
//!
//! Money never goes through floating point: a price is the seed's decimal text read into an integer
//! number of 10⁻¹² units of the price unit (the seed refuses more than 12 decimal places, so this is
//! exact), a cost is tokens × that in `u128`, and sums are integers until they are printed as plain
//! decimals (`0.0000049`, `0`). Float drift in spend tracking is what LiteLLM and others report;
//! here `3e-8 × 10,000 records` is exactly `0.0003`.
//!
//! A record is read from its JSON shape only (native, OpenAI or Anthropic `usage`, Kong `http-log`
//! with AI analytics); whether its consumer and entry exist is the adapter's question.

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use super::decimal::Decimal;
use super::model::EntryFields;

/// Units of 10⁻¹² in one unit of the price.
pub const PICO: u128 = 1_000_000_000_000;
/// Decimal places of an amount.
const PLACES: u32 = 12;
/// The largest token count one record may carry: sums of a batch stay exact below 2⁵³ in the
/// store's scripts, and no single call consumes a trillion tokens.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;
/// The largest cost one record may carry, in price units: far above any real call, and it keeps
/// every sum of the counters (which hold 9.2 × 10¹⁸ units) from overflowing.
const MAX_RECORD_COST_UNITS: u128 = 1_000_000_000_000_000;
/// How far ahead of this replica's clock a record's time may be (clock skew between a gateway and
/// the service), SPEC §9.
pub const MAX_AHEAD: SignedDuration = SignedDuration::from_secs(300);
/// Longest request id kept (its digest is what is stored; this bounds the work of hashing).
const MAX_REQUEST_ID: usize = 1024;

/// An amount of money in units of 10⁻¹² of the price unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(pub u128);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    /// A validated price or budget (at most 12 decimal places); anything larger than a `u128` of
    /// units saturates, which validation never lets through.
    pub fn of(value: &Decimal) -> Amount {
        Amount(value.to_units(PLACES).unwrap_or(u128::MAX))
    }

    /// Whole units and the rest in 10⁻¹² (`< 10¹²`), as the store keeps them.
    pub fn split(self) -> (u128, u64) {
        (self.0 / PICO, (self.0 % PICO) as u64)
    }

    pub fn from_parts(whole: u64, pico: u64) -> Amount {
        Amount(u128::from(whole) * PICO + u128::from(pico))
    }

    /// Whole units, rounded down (RateLimit's `r` and `q` for cost members).
    pub fn whole_units(self) -> u64 {
        u64::try_from(self.0 / PICO).unwrap_or(u64::MAX)
    }

    pub fn saturating_add(self, other: Amount) -> Amount {
        Amount(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount(self.0.saturating_sub(other.0))
    }

    /// For dashboards only (`uma_usage_cost_total`): the exact figures are the API's.
    pub fn approximate(self) -> f64 {
        let (whole, pico) = self.split();
        whole as f64 + pico as f64 / PICO as f64
    }

    /// Plain decimal: no exponent, no trailing zeros, `0` for zero.
    pub fn plain(self) -> String {
        let (whole, pico) = self.split();
        if pico == 0 {
            return whole.to_string();
        }
        let fraction = format!("{pico:012}");
        format!("{whole}.{}", fraction.trim_end_matches('0'))
    }
}

/// An entry's prices per token, in 10⁻¹² units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    pub input: Amount,
    pub output: Amount,
    /// `cache_read_input_token_cost`; cache reads cost `input` without it.
    pub cache_read: Option<Amount>,
}

impl Prices {
    pub fn of(fields: &EntryFields) -> Prices {
        Prices {
            input: Amount::of(&fields.input_cost_per_token),
            output: Amount::of(&fields.output_cost_per_token),
            cache_read: fields.cache_read_input_token_cost.as_ref().map(Amount::of),
        }
    }

    /// `input × input price + output × output price`, cache reads at their own price when the entry
    /// has one. `None` past the largest cost a record may carry.
    pub fn cost(&self, tokens: &Tokens) -> Option<Amount> {
        let cached = tokens.cache_read.min(tokens.input);
        let cache_price = self.cache_read.unwrap_or(self.input);
        let total = [
            (tokens.input - cached, self.input),
            (cached, cache_price),
            (tokens.output, self.output),
        ]
        .into_iter()
        .try_fold(0u128, |sum, (n, price)| {
            u128::from(n)
                .checked_mul(price.0)
                .and_then(|c| sum.checked_add(c))
        })?;
        (total <= MAX_RECORD_COST_UNITS * PICO).then_some(Amount(total))
    }
}

/// Tokens one record consumed. `cache_read` is part of `input`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
}

/// Input tokens, output tokens and cost: one slot's, day's or month's sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub input: u64,
    pub output: u64,
    pub cost: Amount,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.input = self.input.saturating_add(other.input);
        self.output = self.output.saturating_add(other.output);
        self.cost = self.cost.saturating_add(other.cost);
    }

    pub fn of(tokens: &Tokens, cost: Amount) -> Totals {
        Totals {
            requests: 0,
            input: tokens.input,
            output: tokens.output,
            cost,
        }
    }

    /// `{"requests":3,"input_tokens":14,"output_tokens":21,"cost":"0.0000049"}`
    pub fn write_json(&self, out: &mut String) {
        out.push_str(&format!(
            "{{\"requests\":{},\"input_tokens\":{},\"output_tokens\":{},\"cost\":\"{}\"}}",
            self.requests,
            self.input,
            self.output,
            self.cost.plain()
        ));
    }
}

/// Why a record is not recorded; the reason is the answer's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    NotARecord,
    MissingRequestId,
    InvalidRequestId,
    MissingConsumer,
    UnknownConsumer,
    MissingEntry,
    EntryNotAvailable,
    InvalidTokens,
    InvalidTime,
    TooOld,
    InFuture,
    CostOutOfRange,
}

impl Reject {
    pub fn reason(self) -> &'static str {
        match self {
            Reject::NotARecord => "not a usage record",
            Reject::MissingRequestId => "missing request_id",
            Reject::InvalidRequestId => "invalid request_id",
            Reject::MissingConsumer => "missing consumer",
            Reject::UnknownConsumer => "unknown consumer",
            Reject::MissingEntry => "missing metadata_id",
            Reject::EntryNotAvailable => "entry not available to the consumer",
            Reject::InvalidTokens => "invalid token count",
            Reject::InvalidTime => "invalid time",
            Reject::TooOld => "time too old",
            Reject::InFuture => "time in the future",
            Reject::CostOutOfRange => "cost out of range",
        }
    }
}

/// What one record says, before its consumer and entry are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub request_id: String,
    pub consumer: String,
    pub entry: String,
    pub tokens: Tokens,
    /// `None`: the time it arrived.
    pub time: Option<Timestamp>,
}

/// Reads a native or Kong `http-log` record.
pub fn read_record(value: &Value) -> Result<UsageRecord, Reject> {
    let Value::Object(_) = value else {
        return Err(Reject::NotARecord);
    };
    match value.pointer("/ai/proxy/usage") {
        Some(usage @ Value::Object(_)) => read_kong(value, usage),
        _ => read_native(value),
    }
}

fn read_native(value: &Value) -> Result<UsageRecord, Reject> {
    let tokens = if value.get("input_tokens").is_some() || value.get("output_tokens").is_some() {
        Tokens {
            input: count(value.get("input_tokens"))?,
            output: count(value.get("output_tokens"))?,
            cache_read: 0,
        }
    } else {
        match value.get("usage") {
            Some(usage @ Value::Object(_)) => usage_tokens(usage)?,
            _ => return Err(Reject::NotARecord),
        }
    };
    Ok(UsageRecord {
        request_id: request_id(value.get("request_id"))?,
        consumer: name(value.get("consumer"), Reject::MissingConsumer)?,
        entry: name(value.get("metadata_id"), Reject::MissingEntry)?,
        tokens,
        time: match value.get("time") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.parse().map_err(|_| Reject::InvalidTime)?),
            Some(number) => Some(epoch_millis(number)?),
        },
    })
}

/// Kong `http-log` with `ai-proxy` statistics (STACK.md: field paths; the singular spelling of
/// older docs is accepted; Kong's own `cost` is ignored: the entry's prices decide).
fn read_kong(value: &Value, usage: &Value) -> Result<UsageRecord, Reject> {
    let field = |names: &[&str]| names.iter().find_map(|n| usage.get(*n));
    let input = field(&["prompt_tokens", "prompt_token", "input_tokens"]);
    let output = field(&["completion_tokens", "completion_token", "output_tokens"]);
    let tokens = Tokens {
        input: count(input)?,
        output: count(output)?,
        cache_read: count(usage.pointer("/prompt_tokens_details/cached_tokens"))?,
    };
    let header = |name: &str| value.get("request")?.get("headers")?.get(name);
    let consumer = match value.pointer("/consumer/username") {
        Some(username @ Value::String(_)) => Some(username),
        _ => header("x-consumer-username"),
    };
    Ok(UsageRecord {
        request_id: request_id(value.pointer("/request/id"))?,
        consumer: name(consumer, Reject::MissingConsumer)?,
        entry: name(header("x-consumer-id"), Reject::MissingEntry)?,
        tokens,
        time: match value.get("started_at") {
            None | Some(Value::Null) => None,
            Some(number) => Some(epoch_millis(number)?),
        },
    })
}

/// An OpenAI (`prompt_tokens`, cached tokens inside them) or OpenAI Responses / Anthropic
/// (`input_tokens`; Anthropic's excludes its cache reads and writes, which count as input too)
/// `usage` object.
fn usage_tokens(usage: &Value) -> Result<Tokens, Reject> {
    if usage.get("prompt_tokens").is_some() || usage.get("completion_tokens").is_some() {
        return Ok(Tokens {
            input: count(usage.get("prompt_tokens"))?,
            output: count(usage.get("completion_tokens"))?,
            cache_read: count(usage.pointer("/prompt_tokens_details/cached_tokens"))?,
        });
    }
    if usage.get("input_tokens").is_none() && usage.get("output_tokens").is_none() {
        return Err(Reject::NotARecord);
    }
    let input = count(usage.get("input_tokens"))?;
    let output = count(usage.get("output_tokens"))?;
    let cache_write = count(usage.get("cache_creation_input_tokens"))?;
    let anthropic_read = count(usage.get("cache_read_input_tokens"))?;
    let responses_read = count(usage.pointer("/input_tokens_details/cached_tokens"))?;
    let input = input
        .checked_add(cache_write)
        .and_then(|n| n.checked_add(anthropic_read))
        .filter(|n| *n <= MAX_TOKENS)
        .ok_or(Reject::InvalidTokens)?;
    Ok(Tokens {
        input,
        output,
        cache_read: anthropic_read + responses_read,
    })
}

/// A token count: absent or null is 0; otherwise an integer 0..=10¹² (`14.0` is 14).
fn count(value: Option<&Value>) -> Result<u64, Reject> {
    let n = match value {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n) => n,
            None => match n.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= MAX_TOKENS as f64 => f as u64,
                _ => return Err(Reject::InvalidTokens),
            },
        },
        Some(_) => return Err(Reject::InvalidTokens),
    };
    if n > MAX_TOKENS {
        return Err(Reject::InvalidTokens);
    }
    Ok(n)
}

fn request_id(value: Option<&Value>) -> Result<String, Reject> {
    match value {
        Some(Value::String(id)) if id.len() > MAX_REQUEST_ID => Err(Reject::InvalidRequestId),
        Some(Value::String(id)) if !id.is_empty() => Ok(id.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(Reject::MissingRequestId),
    }
}

fn name(value: Option<&Value>, missing: Reject) -> Result<String, Reject> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(missing),
    }
}

fn epoch_millis(value: &Value) -> Result<Timestamp, Reject> {
    value
        .as_i64()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .ok_or(Reject::InvalidTime)
}

/// SPEC §9: a record older than the dedup window could be a replay whose first copy is forgotten;
/// one far ahead would stay "new" past it.
pub fn check_time(time: Timestamp, now: Timestamp, dedup: SignedDuration) -> Result<(), Reject> {
    let age = now.duration_since(time);
    if age > dedup {
        Err(Reject::TooOld)
    } else if -age > MAX_AHEAD {
        Err(Reject::InFuture)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn price(text: &str) -> Amount {
        Amount::of(&Decimal::parse(text).unwrap())
    }

    #[test]
    fn prices_and_costs_are_exact() {
        assert_eq!(price("5e-08"), Amount(50_000));
        assert_eq!(price("3e-8").plain(), "0.00000003");
        assert_eq!(price("2").plain(), "2");
        assert_eq!(Amount::ZERO.plain(), "0");
        assert_eq!(Amount(PICO * 12 + 500_000_000_000).plain(), "12.5");
        let prices = Prices {
            input: price("1.5e-7"),
            output: price("0.000000075"),
            cache_read: None,
        };
        let tokens = Tokens {
            input: 14,
            output: 21,
            cache_read: 0,
        };
        // 14 × 0.00000015 + 21 × 0.000000075 = 0.0000021 + 0.000001575
        assert_eq!(prices.cost(&tokens).unwrap().plain(), "0.000003675");
        // What f64 gets wrong: 3 × 0.1.
        let tenth = Prices {
            input: price("0.1"),
            output: Amount::ZERO,
            cache_read: None,
        };
        let three = Tokens {
            input: 3,
            ..Tokens::default()
        };
        assert_eq!(tenth.cost(&three).unwrap().plain(), "0.3");
        assert_eq!(Amount(PICO * 7 + 1).split(), (7, 1));
        assert_eq!(Amount::from_parts(7, 1), Amount(PICO * 7 + 1));
        assert_eq!(Amount(PICO * 7 + 999).whole_units(), 7);
    }

    #[test]
    fn cache_reads_use_their_own_price_when_there_is_one() {
        let tokens = Tokens {
            input: 100,
            output: 0,
            cache_read: 40,
        };
        let mut prices = Prices {
            input: price("0.01"),
            output: Amount::ZERO,
            cache_read: None,
        };
        assert_eq!(prices.cost(&tokens).unwrap().plain(), "1");
        prices.cache_read = Some(price("0.001"));
        assert_eq!(prices.cost(&tokens).unwrap().plain(), "0.64");
    }

    #[test]
    fn a_record_costing_more_than_its_bound_is_refused() {
        let prices = Prices {
            input: price("1000000000000000"),
            output: Amount::ZERO,
            cache_read: None,
        };
        let tokens = Tokens {
            input: MAX_TOKENS,
            ..Tokens::default()
        };
        assert_eq!(prices.cost(&tokens), None);
    }

    #[test]
    fn native_records_and_usage_shapes() {
        let base = |extra: Value| {
            let mut v = json!({"request_id":"r1","consumer":"u","metadata_id":"e"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            read_record(&v)
        };
        let r = base(json!({"input_tokens":14,"output_tokens":21,"time":"2026-12-01T08:00:00Z"}))
            .unwrap();
        assert_eq!((r.tokens.input, r.tokens.output), (14, 21));
        assert_eq!(r.time, Some("2026-12-01T08:00:00Z".parse().unwrap()));
        let openai = base(json!({"usage":{"prompt_tokens":10,"completion_tokens":5,
            "prompt_tokens_details":{"cached_tokens":4}}}))
        .unwrap();
        assert_eq!(
            openai.tokens,
            Tokens {
                input: 10,
                output: 5,
                cache_read: 4
            }
        );
        let anthropic = base(json!({"usage":{"input_tokens":10,"output_tokens":5,
            "cache_creation_input_tokens":3,"cache_read_input_tokens":7}}))
        .unwrap();
        assert_eq!(
            anthropic.tokens,
            Tokens {
                input: 20,
                output: 5,
                cache_read: 7
            }
        );
        assert_eq!(base(json!({})), Err(Reject::NotARecord));
        assert_eq!(base(json!({"input_tokens":-1})), Err(Reject::InvalidTokens));
        assert_eq!(
            base(json!({"input_tokens":1.5})),
            Err(Reject::InvalidTokens)
        );
        assert_eq!(
            base(json!({"input_tokens":"3"})),
            Err(Reject::InvalidTokens)
        );
        assert_eq!(
            base(json!({"input_tokens":1_000_000_000_001u64})),
            Err(Reject::InvalidTokens)
        );
        assert_eq!(base(json!({"input_tokens":2.0})).unwrap().tokens.input, 2);
        assert_eq!(
            base(json!({"input_tokens":1,"time":"yesterday"})),
            Err(Reject::InvalidTime)
        );
        assert_eq!(
            read_record(&json!({"consumer":"u","metadata_id":"e","input_tokens":1})),
            Err(Reject::MissingRequestId)
        );
        assert_eq!(
            read_record(&json!({"request_id":"r","metadata_id":"e","input_tokens":1})),
            Err(Reject::MissingConsumer)
        );
        assert_eq!(
            read_record(&json!({"request_id":"r","consumer":"u","input_tokens":1})),
            Err(Reject::MissingEntry)
        );
        assert_eq!(read_record(&json!([1])), Err(Reject::NotARecord));
    }

    #[test]
    fn kong_http_log_records() {
        let log = json!({
            "request": {"id": "k1", "headers": {"x-consumer-username": "u", "x-consumer-id": "e"}},
            "started_at": 1_764_576_000_000i64,
            "ai": {"proxy": {"usage": {"prompt_token": 9, "completion_token": 4, "cost": 0.1}}}
        });
        let r = read_record(&log).unwrap();
        assert_eq!(
            (r.request_id.as_str(), r.consumer.as_str(), r.entry.as_str()),
            ("k1", "u", "e")
        );
        assert_eq!((r.tokens.input, r.tokens.output), (9, 4));
        assert_eq!(
            r.time,
            Some(Timestamp::from_millisecond(1_764_576_000_000).unwrap())
        );
        let mut with_consumer = log.clone();
        with_consumer["consumer"] = json!({"username": "kong-user", "id": "x"});
        assert_eq!(read_record(&with_consumer).unwrap().consumer, "kong-user");
        let mut no_id = log.clone();
        no_id["request"]["headers"]
            .as_object_mut()
            .unwrap()
            .remove("x-consumer-id");
        assert_eq!(read_record(&no_id), Err(Reject::MissingEntry));
    }

    #[test]
    fn times_inside_the_window_only() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let six = SignedDuration::from_hours(6);
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(check_time(at("2026-12-01T06:00:00Z"), now, six), Ok(()));
        assert_eq!(
            check_time(at("2026-12-01T05:59:59Z"), now, six),
            Err(Reject::TooOld)
        );
        assert_eq!(check_time(at("2026-12-01T12:05:00Z"), now, six), Ok(()));
        assert_eq!(
            check_time(at("2026-12-01T12:05:01Z"), now, six),
            Err(Reject::InFuture)
        );
    }
}
