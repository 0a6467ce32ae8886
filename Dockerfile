# The matching service: ONNX Runtime, no PyTorch. The model folder comes from the image
# (service/default_model, when bundled) or from a volume named by DSMI_MODEL_DIR.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY service ./service
# Editable, so that service/default_model is found next to the code.
RUN pip install --no-cache-dir -e '.[serve]'

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz')"
CMD ["dsmi", "serve", "--host", "0.0.0.0", "--port", "8000"]
