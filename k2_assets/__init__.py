"""What K2 computes: Bronze, Silver and Gold assets with their checks, jobs, sensors and schedules."""
