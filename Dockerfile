# A krules instance: the package and the example rulesets, served over HTTP.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY krules ./krules
COPY storage ./storage
COPY middleware ./middleware
COPY rulesets ./rulesets
RUN pip install --no-cache-dir . && useradd --system krules
USER krules
# Inside a container the ingress must listen beyond loopback; publish the port deliberately.
ENV KRULES_HTTP_HOST=0.0.0.0 KRULES_HTTP_PORT=8080
EXPOSE 8080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["krules"]
CMD ["run", "rulesets"]
