"""The dashboard's widgets; pure rendering lives in render.py."""
