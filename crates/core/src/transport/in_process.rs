//! [`InProcessTransport`]: the embedded default broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{
    InboundMessage, MessageDelivery, MessageSource, OutboundMessage, Transport, TransportError,
};

/// An in-process broker: named destinations that must be declared first,
/// a durable log per destination, and any number of subscribers per
/// destination, each receiving every message (from the start of the log)
/// at least once.
///
/// A publish is confirmed once the message is in the destination's log.
/// Publishing to an undeclared destination is
/// [`TransportError::UnknownDestination`]; a message larger than the
/// optional maximum ([`OutboundMessage::wire_size`]) is
/// [`TransportError::MessageTooLarge`]. A delivery that is nacked comes back
/// after the delay; one dropped without ack or nack comes back at once;
/// either way with `delivery_attempt` one higher.
///
/// Clones share the broker.
///
/// ```
/// use vextrus_core::transport::{InProcessTransport, MessageDelivery, MessageSource, OutboundMessage, Transport};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let broker = InProcessTransport::new();
/// broker.declare("orders");
/// let mut sub = broker.subscribe("orders").unwrap();
///
/// let msg = OutboundMessage::new("orders", "order-1", b"hello".to_vec());
/// broker.publish(&msg).await.unwrap();
///
/// let delivery = sub.next().await.unwrap().unwrap();
/// assert_eq!(delivery.message().id, msg.id);
/// assert_eq!(delivery.message().delivery_attempt, 1);
/// delivery.ack().await.unwrap();
///
/// let unknown = OutboundMessage::new("nowhere", "k", vec![]);
/// assert!(broker.publish(&unknown).await.is_err());
/// # });
/// ```
#[derive(Clone, Default)]
pub struct InProcessTransport {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    destinations: Mutex<HashMap<String, Destination>>,
    max_size: Option<usize>,
}

#[derive(Default)]
struct Destination {
    log: Vec<OutboundMessage>,
    subscribers: Vec<mpsc::UnboundedSender<InboundMessage>>,
}

impl std::fmt::Debug for InProcessTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.lock();
        f.debug_struct("InProcessTransport")
            .field("destinations", &d.len())
            .field("max_size", &self.inner.max_size)
            .finish()
    }
}

impl InProcessTransport {
    /// A broker with no destinations and no size limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A broker that rejects messages larger than `max` bytes
    /// ([`OutboundMessage::wire_size`]).
    pub fn with_max_size(max: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                destinations: Mutex::default(),
                max_size: Some(max),
            }),
        }
    }

    /// Declares a destination (idempotent).
    pub fn declare(&self, destination: &str) {
        self.lock().entry(destination.to_owned()).or_default();
    }

    /// Whether `destination` is declared.
    pub fn is_declared(&self, destination: &str) -> bool {
        self.lock().contains_key(destination)
    }

    /// Every message confirmed on `destination`, in publish order
    /// (duplicates included: a retried publish appears twice).
    pub fn published(&self, destination: &str) -> Vec<OutboundMessage> {
        self.lock()
            .get(destination)
            .map(|d| d.log.clone())
            .unwrap_or_default()
    }

    /// Subscribes to `destination`: the subscription receives every message
    /// already in its log, then every new one.
    pub fn subscribe(&self, destination: &str) -> Result<InProcessSubscription, TransportError> {
        let mut map = self.lock();
        let dest = map
            .get_mut(destination)
            .ok_or_else(|| TransportError::UnknownDestination(destination.to_owned()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        for m in &dest.log {
            // The receiver is alive: it is in our hands.
            let _ = tx.send(InboundMessage::from_outbound(m, 1));
        }
        dest.subscribers.push(tx.clone());
        Ok(InProcessSubscription { rx, redeliver: tx })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Destination>> {
        // Every mutation is a single push: a panic cannot leave it half done.
        self.inner
            .destinations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Transport for InProcessTransport {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        if let Some(max) = self.inner.max_size {
            let size = message.wire_size();
            if size > max {
                return Err(TransportError::MessageTooLarge { size, max });
            }
        }
        let mut map = self.lock();
        let dest = map
            .get_mut(&message.destination)
            .ok_or_else(|| TransportError::UnknownDestination(message.destination.clone()))?;
        dest.log.push(message.clone());
        let inbound = InboundMessage::from_outbound(message, 1);
        dest.subscribers.retain(|s| s.send(inbound.clone()).is_ok());
        Ok(())
    }
}

/// A subscription to one destination of an [`InProcessTransport`].
#[derive(Debug)]
pub struct InProcessSubscription {
    rx: mpsc::UnboundedReceiver<InboundMessage>,
    redeliver: mpsc::UnboundedSender<InboundMessage>,
}

impl MessageSource for InProcessSubscription {
    type Delivery = InProcessDelivery;

    async fn next(&mut self) -> Result<Option<InProcessDelivery>, TransportError> {
        // The subscription holds a sender itself, so the channel never closes.
        Ok(self.rx.recv().await.map(|message| InProcessDelivery {
            message,
            redeliver: Some(self.redeliver.clone()),
        }))
    }
}

/// One delivery from an [`InProcessSubscription`]. Dropping it without
/// [`MessageDelivery::ack`] redelivers the message.
#[derive(Debug)]
pub struct InProcessDelivery {
    message: InboundMessage,
    redeliver: Option<mpsc::UnboundedSender<InboundMessage>>,
}

impl InProcessDelivery {
    fn again(&self) -> InboundMessage {
        let mut m = self.message.clone();
        m.delivery_attempt += 1;
        m
    }
}

impl MessageDelivery for InProcessDelivery {
    fn message(&self) -> &InboundMessage {
        &self.message
    }

    async fn ack(mut self) -> Result<(), TransportError> {
        self.redeliver = None;
        Ok(())
    }

    async fn nack(mut self, delay: Duration) -> Result<(), TransportError> {
        let again = self.again();
        if let Some(tx) = self.redeliver.take() {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(again);
            });
        }
        Ok(())
    }
}

impl Drop for InProcessDelivery {
    fn drop(&mut self) {
        if let Some(tx) = self.redeliver.take() {
            let _ = tx.send(self.again());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nack_and_drop_redeliver_with_higher_attempt() {
        let t = InProcessTransport::new();
        t.declare("d");
        let mut sub = t.subscribe("d").unwrap();
        t.publish(&OutboundMessage::new("d", "k", vec![1]))
            .await
            .unwrap();
        let d = sub.next().await.unwrap().unwrap();
        d.nack(Duration::from_millis(1)).await.unwrap();
        let d = sub.next().await.unwrap().unwrap();
        assert_eq!(d.message().delivery_attempt, 2);
        drop(d);
        let d = sub.next().await.unwrap().unwrap();
        assert_eq!(d.message().delivery_attempt, 3);
        d.ack().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), sub.next())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn size_limit_and_late_subscribers() {
        let t = InProcessTransport::with_max_size(8);
        t.declare("d");
        let err = t
            .publish(&OutboundMessage::new("d", "k", vec![0; 9]))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            TransportError::MessageTooLarge { size: 9, max: 8 }
        ));
        t.publish(&OutboundMessage::new("d", "k", vec![0; 8]))
            .await
            .unwrap();
        let mut late = t.subscribe("d").unwrap();
        assert_eq!(
            late.next().await.unwrap().unwrap().message().payload.len(),
            8
        );
        assert!(t.subscribe("nope").is_err());
        assert_eq!(t.published("d").len(), 1);
    }
}
