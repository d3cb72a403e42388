"""Markdown tables from pandas DataFrames (without the optional 'tabulate' dependency)."""


def to_markdown(df, digits=2):
    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return ""
            # a small non-zero value (a learning rate such as 1e-3) keeps its significant digits
            return f"{v:.{digits}g}" if 0 < abs(v) < 10 ** -digits else f"{v:.{digits}f}"
        return str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"
