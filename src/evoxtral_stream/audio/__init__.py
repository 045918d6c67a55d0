"""Audio capture, resampling and voice-activity segmentation."""
