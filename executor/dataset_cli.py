"""Data sets from the shell: ``dlhub publish-dataset DIR --title ...`` and
``dlhub download owner/name[:version] [FILE]`` (thin layers over :class:`Client`).
``dlhub search --kind dataset`` and ``dlhub describe`` (either kind) are in ``repo_cli``."""

from __future__ import annotations

from pathlib import Path

import click


def register(main: click.Group, home_option, friendly, client_of) -> None:
    @main.command(name="publish-dataset")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False))
    @click.option("--title", required=True, help="one-line title")
    @click.option("--name", help="data set name (default: the directory's, lowercased)")
    @click.option("--author", "authors", multiple=True, help='"Family, Given" (repeat for several)')
    @click.option("--description", default="")
    @click.option("--domain", "domains", multiple=True)
    @click.option("--keyword", "keywords", multiple=True)
    @click.option("--license", "license_", default=None)
    @click.option("--doi", default=None, help="its DOI, e.g. 10.5281/zenodo.123")
    @click.option("--related", "related", multiple=True, help="a related identifier (DOI, URL; repeat)")
    @click.option("--private", is_flag=True, help="only you, admins and whom you share it with")
    @home_option
    @friendly
    def publish_dataset(directory, title, name, authors, description, domains, keywords, license_, doi,
                        related, private, home):  # fmt: skip
        """Publish the files under DIRECTORY as a data set (uploaded in chunks, resumable: run it
        again after an interruption; sha256 checked); prints owner/name:version."""
        from .dataset import Dataset

        client = client_of(home)
        default = Path(directory).resolve().name.lower().replace(" ", "-")
        dataset = Dataset(
            name or default,
            title=title,
            authors=list(authors) or [client.whoami()],
            files=directory,
            description=description,
            domains=domains,
            keywords=keywords,
            license=license_,
            doi=doi,
            related_identifiers=related,
            visibility="private" if private else None,
        )
        click.echo(client.publish_dataset(dataset))

    @main.command()
    @click.argument("ref")
    @click.argument("file", required=False)
    @click.option("--to", "to", default=".", type=click.Path(file_okay=False), help="folder to write into")
    @home_option
    @friendly
    def download(ref, file, to, home):
        """Download the files of data set REF (owner/name[:version]), or only FILE, into --to;
        each is checked against its sha256 before it appears."""
        for path in client_of(home).download(ref, file, to=to):
            click.echo(str(path))
