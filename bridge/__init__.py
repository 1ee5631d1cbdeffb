"""The Outpost bridge: consumes hub commands from RabbitMQ and carries them out at Outposts."""
