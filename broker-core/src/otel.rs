//! OpenTelemetry trace context on messages (feature `otel`).
//!
//! The library's spans are `tracing` spans; with a
//! [`tracing_opentelemetry`] layer installed they are OpenTelemetry spans
//! too, and this module carries their context across the broker in the
//! W3C form:
//!
//! - on publish, the [`Instrumented`](crate::instrument::Instrumented)
//!   layer writes the context of its `publish` span (a child of the span
//!   the caller is in, such as an HTTP request's) into the message's
//!   `traceparent`, and the trace state into a `tracestate` header when
//!   there is one, unless the message already carries a `traceparent`;
//! - on handle, the consumer runtime makes the `handle` span a child of the
//!   context the message carries, so the consumer's work joins the
//!   publisher's trace on every backend.
//!
//! Without an OpenTelemetry layer (or for a span that is not recorded) the
//! message gets a fresh `traceparent` as without the feature.
//!
//! [`inject_context`] and [`extract_context`] do the same for code that
//! publishes or reads messages outside the [`Instrumented`] layer and the
//! consumer runtime.
//!
//! [`Instrumented`]: crate::instrument::Instrumented

/// The `opentelemetry` API this module is built on.
pub use opentelemetry;
/// The `opentelemetry_sdk` this module is built on (trace feature).
pub use opentelemetry_sdk;
/// The `tracing-opentelemetry` layer this module is built on: install its
/// layer with a tracer of the same `opentelemetry` version.
pub use tracing_opentelemetry;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::message::{header, Message};

/// Writes the span context of `cx` into `message`: its `traceparent`, and
/// a `tracestate` header when the trace state is not empty. Returns false
/// (and changes nothing) when `cx` has no valid span context.
///
/// ```
/// use broker_core::{otel, Message};
/// use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
///
/// let span = SpanContext::new(
///     TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
///     SpanId::from_hex("b7ad6b7169203331").unwrap(),
///     TraceFlags::SAMPLED,
///     true,
///     TraceState::NONE,
/// );
/// let cx = opentelemetry::Context::new().with_remote_span_context(span);
/// let mut message = Message::new("x");
/// assert!(otel::inject_context(&cx, &mut message));
/// assert_eq!(
///     message.traceparent(),
///     Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
/// );
/// let back = otel::extract_context(&message);
/// assert_eq!(back.span().span_context().trace_id(), cx.span().span_context().trace_id());
/// ```
pub fn inject_context(cx: &Context, message: &mut Message) -> bool {
    if !cx.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(cx, &mut MessageInjector(message));
    true
}

/// The remote context `message` carries (`traceparent` and the
/// `tracestate` header): the parent for work done on its behalf. A missing
/// or malformed `traceparent` gives a context without a span.
pub fn extract_context(message: &Message) -> Context {
    TraceContextPropagator::new().extract(&MessageExtractor(message))
}

/// The OpenTelemetry context of the work running now: the current
/// `tracing` span's (with a `tracing_opentelemetry` layer installed), else
/// OpenTelemetry's own current context (a span entered through its API).
/// Either may hold no valid span context.
pub(crate) fn current_context() -> Context {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        cx
    } else {
        Context::current()
    }
}

/// Writes the context of the current span ([`current_context`]) into
/// `message`, replacing its `traceparent`. Returns false (and changes
/// nothing) when there is no valid span context: see
/// [`Message::caused_by`].
pub(crate) fn inject_current(message: &mut Message) -> bool {
    inject_context(&current_context(), message)
}

/// Gives `message` the OpenTelemetry context of `span` when it has no
/// `traceparent` yet. Returns true when it did.
pub(crate) fn inject_span(span: &tracing::Span, message: &mut Message) -> bool {
    if message.traceparent().is_some() {
        return false;
    }
    inject_context(&span.context(), message)
}

/// Makes `span` (not entered yet) a child of the context `message`
/// carries. A message without a valid `traceparent` leaves it alone.
pub(crate) fn set_parent(span: &tracing::Span, message: &Message) {
    let cx = extract_context(message);
    if cx.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer (or for a disabled
        // span): then there is no OpenTelemetry span to connect.
        let _ = span.set_parent(cx);
    }
}

struct MessageInjector<'a>(&'a mut Message);

impl Injector for MessageInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        match key {
            header::TRACEPARENT => self.0.set_traceparent(value),
            header::TRACESTATE if !value.is_empty() => {
                self.0.headers_mut().insert(header::TRACESTATE, value)
            }
            _ => {}
        }
    }
}

struct MessageExtractor<'a>(&'a Message);

impl Extractor for MessageExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            header::TRACEPARENT => self.0.traceparent(),
            header::TRACESTATE => self.0.headers().get_str(header::TRACESTATE),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        [header::TRACEPARENT, header::TRACESTATE]
            .into_iter()
            .filter(|k| self.get(k).is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn context(state: TraceState) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            state,
        ))
    }

    #[test]
    fn trace_state_travels_in_its_header_when_present() {
        let state: TraceState = "vendor=abc,other=1".parse().unwrap();
        let mut message = Message::new("x");
        assert!(inject_context(&context(state), &mut message));
        assert_eq!(
            message.headers().get_str(header::TRACESTATE),
            Some("vendor=abc,other=1")
        );
        let back = extract_context(&message);
        assert_eq!(
            back.span().span_context().trace_state().get("vendor"),
            Some("abc")
        );

        let mut plain = Message::new("x");
        assert!(inject_context(&context(TraceState::NONE), &mut plain));
        assert!(plain.headers().get(header::TRACESTATE).is_none());
    }

    #[test]
    fn caused_by_continues_the_current_span() {
        let cause = Message::new("cause")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let _current = context(TraceState::NONE).attach();
        let effect = Message::new("effect").caused_by(&cause);
        assert_eq!(
            effect.traceparent(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(effect.correlation_id(), Some(cause.id()));
        assert!(effect.headers().get(header::TRACESTATE).is_none());
    }

    #[test]
    fn caused_by_keeps_the_current_span_flags_and_state() {
        let unsampled = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::default(),
            true,
            "vendor=abc".parse().unwrap(),
        ));
        let _current = unsampled.attach();
        let effect = Message::new("effect").caused_by(&Message::new("cause"));
        assert_eq!(
            effect.traceparent(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
        );
        assert_eq!(
            effect.headers().get_str(header::TRACESTATE),
            Some("vendor=abc")
        );
    }

    #[test]
    fn caused_by_without_a_current_span_continues_the_cause() {
        assert!(!current_context().span().span_context().is_valid());
        let cause = Message::new("cause")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let effect = Message::new("effect").caused_by(&cause);
        let tp = effect.traceparent().unwrap();
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
            "{tp}"
        );
        assert_ne!(tp, cause.traceparent().unwrap());
        assert_eq!(tp.len(), 55);
        // A context without a valid span is no current span either.
        let _empty = Context::new().attach();
        let effect = Message::new("effect").caused_by(&cause);
        assert!(effect
            .traceparent()
            .unwrap()
            .starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
    }

    #[test]
    fn no_span_context_changes_nothing() {
        let mut message = Message::new("x");
        assert!(!inject_context(&Context::new(), &mut message));
        assert!(message.traceparent().is_none());
        let malformed = Message::new("x").with_traceparent("not-a-traceparent");
        assert!(!extract_context(&malformed).span().span_context().is_valid());
    }
}
