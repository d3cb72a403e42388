"""Markdown tables from pandas DataFrames (without the optional 'tabulate' dependency)."""


def to_markdown(df, digits=2):
    def fmt(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.{digits}f}"
        return str(v)
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"
