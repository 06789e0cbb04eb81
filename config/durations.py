"""Durations that settings and limits are written in, so `7 * DAY_S` reads as a week."""

HOUR_S = 3_600
DAY_S = 24 * HOUR_S
