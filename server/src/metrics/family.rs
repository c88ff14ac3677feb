//! The one set of helpers the scrape-time collectors write their metric
//! families with: an unlabelled sample ([`single`]) or one sample per label
//! value ([`family`]), each a counter or an integer gauge ([`Kind`]).

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Whether a metric only grows (counter) or goes both ways (gauge).
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Gauge,
    Counter,
}

impl Kind {
    fn metric_type(self) -> MetricType {
        match self {
            Kind::Gauge => MetricType::Gauge,
            Kind::Counter => MetricType::Counter,
        }
    }

    fn encode(self, v: u64, sample: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self {
            Kind::Gauge => ConstGauge::new(v as i64).encode(sample),
            Kind::Counter => ConstCounter::new(v).encode(sample),
        }
    }
}

/// One metric family with one sample per `(label value, value)` under `label`.
pub(super) fn family(
    encoder: &mut DescriptorEncoder,
    kind: Kind,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind.metric_type())?;
    for (value_label, v) in values {
        kind.encode(*v, family.encode_family(&[(label, *value_label)])?)?;
    }
    Ok(())
}

/// One unlabelled sample.
pub(super) fn single(
    encoder: &mut DescriptorEncoder,
    kind: Kind,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    kind.encode(
        value,
        encoder.encode_descriptor(name, help, None, kind.metric_type())?,
    )
}

/// One unlabelled gauge of a fractional value (seconds).
pub(super) fn single_f64_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}
