//! The application's side of the delay reader: the stream of due records,
//! the acker of each, and the stream that merges them with the topic's.

use super::*;

/// The due records of one subscription.
pub(crate) struct DelayStream {
    pub(super) shared: Arc<Shared>,
    pub(super) retry: Retry,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) driver: Option<JoinHandle<Result<()>>>,
    pub(super) close_timeout: Duration,
}

#[async_trait]
impl DeliveryStream for DelayStream {
    // Cancel-safe: a record leaves `ready` only in the step that returns it.
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            let notified = self.shared.ready.notified();
            if let Some(next) = self.next_now() {
                return next;
            }
            notified.await;
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(driver) = self.driver.take() else {
            return Ok(());
        };
        match tokio::time::timeout(self.close_timeout * 2, driver).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(BrokerError::backend("kafka", join)),
            Err(_) => Err(BrokerError::Timeout {
                operation: "kafka delay subscription close",
                after: self.close_timeout * 2,
            }),
        }
    }
}

impl Drop for DelayStream {
    fn drop(&mut self) {
        // Dropping `stop` ends the driver, which closes the client.
        self.shared.closed.store(true, Ordering::Release);
    }
}

impl DelayStream {
    /// What [`DeliveryStream::next`] would return at once, if anything.
    pub(crate) fn next_now(&self) -> Option<Option<Result<Delivery>>> {
        let mut state = self.shared.lock();
        if let Some(held) = state.ready.pop_front() {
            drop(state);
            return Some(Some(Ok(self.delivery(held))));
        }
        if let Some(e) = state.failure.take() {
            return Some(Some(Err(e)));
        }
        state.finished.then_some(None)
    }

    fn delivery(&self, held: Held) -> Delivery {
        let received = Received {
            message: held.message.clone(),
            topic: self.shared.topic.clone(),
            redelivered: held.redelivered,
            // Its place in the delay topic is no place in the topic.
            partition: None,
            offset: None,
            attempt: held.attempt,
        };
        let acker = DelayAcker {
            shared: self.shared.clone(),
            retry: self.retry.clone(),
            held,
        };
        Delivery::new(received, Box::new(acker))
    }
}

/// Settles one delayed record.
struct DelayAcker {
    shared: Arc<Shared>,
    retry: Retry,
    held: Held,
}

impl DelayAcker {
    fn check_open(&self) -> Result<()> {
        match self.shared.closed.load(Ordering::Acquire) {
            true => Err(BrokerError::Closed("kafka subscription")),
            false => Ok(()),
        }
    }

    fn finish(&self) {
        let acked =
            self.shared
                .lock()
                .tracker
                .ack(self.held.partition, self.held.offset, self.held.token);
        if !acked {
            tracing::debug!(
                partition = self.held.partition,
                "delay record ack ignored: partition revoked or subscription closed"
            );
        }
        self.shared.wake.notify_one();
    }

    fn requeue(self) {
        let Held {
            message,
            partition,
            offset,
            token,
            due,
            attempt,
            ..
        } = self.held;
        let mut state = self.shared.lock();
        let Some(token) = state.tracker.requeue(partition, offset, token) else {
            return;
        };
        state.ready.push_front(Held {
            message,
            partition,
            offset,
            token,
            due,
            redelivered: true,
            attempt: attempt.saturating_add(1),
        });
        drop(state);
        self.shared.ready.notify_one();
    }
}

#[async_trait]
impl Acker for DelayAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.check_open()?;
        self.finish();
        Ok(())
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.check_open()?;
        match requeue {
            true => self.requeue(),
            false => self.finish(),
        }
        Ok(())
    }

    /// Produces the copy to its tier of the delay topic for this group,
    /// then settles this record.
    async fn retry_after(self: Box<Self>, message: Message, delay: Duration) -> Result<()> {
        self.check_open()?;
        let main = self.held.partition % self.shared.main_partitions.max(1);
        match self.retry.send(message, delay, main).await {
            Ok(()) => {
                self.finish();
                Ok(())
            }
            Err(e) => {
                self.requeue();
                Err(e)
            }
        }
    }
}

/// A subscription's deliveries: its topic's and its due delayed records.
pub(crate) struct Merged {
    main: KafkaStream,
    delays: DelayStream,
    main_done: bool,
    delays_done: bool,
}

impl Merged {
    pub(crate) fn new(main: KafkaStream, delays: DelayStream) -> Self {
        Merged {
            main,
            delays,
            main_done: false,
            delays_done: false,
        }
    }
}

#[async_trait]
impl DeliveryStream for Merged {
    // Cancel-safe as both streams are.
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            // What either holds already, without making and dropping both
            // streams' futures (and a waiter on each) per delivery. Due
            // delayed records first: they waited their delay already.
            if !self.delays_done {
                match self.delays.next_now() {
                    Some(Some(next)) => return Some(next),
                    Some(None) => self.delays_done = true,
                    None => {}
                }
            }
            if !self.main_done {
                match self.main.next_now() {
                    Some(Some(next)) => return Some(next),
                    Some(None) => self.main_done = true,
                    None => {}
                }
            }
            match (self.main_done, self.delays_done) {
                (true, true) => return None,
                (false, true) => return self.main.next().await,
                (true, false) => return self.delays.next().await,
                (false, false) => {
                    let (from_main, next) = tokio::select! {
                        next = self.main.next() => (true, next),
                        next = self.delays.next() => (false, next),
                    };
                    match next {
                        Some(next) => return Some(next),
                        None if from_main => self.main_done = true,
                        None => self.delays_done = true,
                    }
                }
            }
        }
    }

    /// Closes the main consumer first: its revokes commit the delay
    /// reader's finished records.
    async fn close(self: Box<Self>) -> Result<()> {
        let Merged { main, delays, .. } = *self;
        let main = Box::new(main).close().await;
        main.and(Box::new(delays).close().await)
    }
}
