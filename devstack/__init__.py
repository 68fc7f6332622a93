"""Development only: a private local stack (redis-server, moto's S3, workers) and the demo
that runs on it. It holds a test callback secret, so it stays out of the images."""
